"""The sender's side of each signature scheme, as a webhook producer would sign (README)."""

import base64
import hashlib
import hmac
import time


def hrflow_header(secret: str, payload: bytes) -> str:
    """`HTTP-HRFLOW-SIGNATURE`: base64url(hex HMAC-SHA256) `.` base64url(payload)."""
    digest = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return (base64.urlsafe_b64encode(digest.encode()).decode() + "."
            + base64.urlsafe_b64encode(payload).decode())


def standard_headers(secret: str, body: bytes, msg_id: str = "msg_1",
                     timestamp: int | None = None) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp`, `webhook-signature` for a `whsec_` secret."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_signature(secret, body, msg_id, timestamp)}


def standard_signature(secret: str, body: bytes, msg_id: str, timestamp: int) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def github_header(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}"}
