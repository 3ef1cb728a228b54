"""Webhook signature schemes (SPEC 11): does this request come from the holder of the secret?

Pure functions of the headers, the raw body, the secret and the time, so
each scheme is tested against its reference implementation without a
daemon. Every comparison of a signature is constant-time
(`hmac.compare_digest`); nothing here logs, and no error message carries
the secret or an expected signature.

- `hrflow`: the `HTTP-HRFLOW-SIGNATURE` header as the hrflow SDK's
  `webhooks.handle` reads it: `base64url(hex HMAC-SHA256(secret, payload))`
  `.` `base64url(payload)`. The event travels inside the header; the body
  is not covered, and there is no timestamp.
- `standard` (standardwebhooks.com): `webhook-id`, `webhook-timestamp`,
  `webhook-signature` with space-separated `v1,<base64 HMAC-SHA256 of
  id.timestamp.body>` under the key `whsec_<base64>`; any one valid
  signature passes (the sender rotating its secret signs with both).
- `github`: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
"""

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

SCHEMES = ("hrflow", "standard", "github")
# Schemes whose signature covers the raw body: the daemon must keep it for them.
SIGNS_BODY = frozenset({"standard", "github"})
HRFLOW_HEADER = "HTTP-HRFLOW-SIGNATURE"
GITHUB_HEADER = "X-Hub-Signature-256"
# Standard Webhooks: a timestamp further than this from now, either way, is refused.
TOLERANCE_S = 5 * 60
STANDARD_PREFIX = "whsec_"


class InvalidSignature(Exception):
    """The request does not carry a valid signature; the message says what was wrong."""


def check_secret(scheme: str, secret: str) -> None:
    """Refuse a secret the scheme cannot use (ValueError, naming the problem, not the secret)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not secret:
        raise ValueError("the secret is empty")
    if scheme == "standard":
        _standard_key(secret)


def verify(scheme: str, secret: str, headers: Mapping[str, str], body: bytes,
           now: float) -> None:
    """Return if the request is signed with `secret` under `scheme`; else InvalidSignature.

    `headers` must look names up case-insensitively (aiohttp's are); `now`
    is seconds since the epoch, used by the schemes with a timestamp.
    """
    if scheme == "hrflow":
        _verify_hrflow(secret, headers)
    elif scheme == "standard":
        _verify_standard(secret, headers, body, now)
    elif scheme == "github":
        _verify_github(secret, headers, body)
    else:
        raise InvalidSignature(f"unknown scheme {scheme!r}")


def _hmac(key: bytes, message: bytes) -> hmac.HMAC:
    return hmac.new(key, message, hashlib.sha256)


def _b64url(text: str) -> bytes:
    """Decode base64url, padded or not, as the SDK's lenient decoder does."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSignature("the signature header is not base64url") from None


def _verify_hrflow(secret: str, headers: Mapping[str, str]) -> None:
    header = headers.get(HRFLOW_HEADER)
    if not header:
        raise InvalidSignature(f"no {HRFLOW_HEADER} header")
    parts = header.split(".", 2)
    if len(parts) < 2:
        raise InvalidSignature(f"{HRFLOW_HEADER} is not SIGNATURE.PAYLOAD")
    signature, payload = _b64url(parts[0]), _b64url(parts[1])
    expected = _hmac(secret.encode(), payload).hexdigest().encode()
    if not hmac.compare_digest(expected, signature):
        raise InvalidSignature(f"{HRFLOW_HEADER} does not match the secret")


def _standard_key(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix(STANDARD_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a standard webhooks secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("the standard webhooks key is empty")
    return key


def _verify_standard(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> None:
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        missing = [name for name, value in (("webhook-id", msg_id),
                                            ("webhook-timestamp", timestamp),
                                            ("webhook-signature", signatures)) if not value]
        raise InvalidSignature(f"missing header(s): {', '.join(missing)}")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise InvalidSignature("webhook-timestamp is not a number of seconds")
    if abs(now - int(timestamp)) > TOLERANCE_S:
        raise InvalidSignature(f"webhook-timestamp is more than {TOLERANCE_S} s from now")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(_hmac(_standard_key(secret), signed).digest())
    valid = False
    for item in signatures.split(" "):
        version, _, signature = item.partition(",")
        if version == "v1":
            valid |= hmac.compare_digest(expected, signature.encode())
    if not valid:
        raise InvalidSignature("no v1 signature in webhook-signature matches the secret")


def _verify_github(secret: str, headers: Mapping[str, str], body: bytes) -> None:
    header = headers.get(GITHUB_HEADER)
    if not header:
        raise InvalidSignature(f"no {GITHUB_HEADER} header")
    algorithm, _, signature = header.partition("=")
    if algorithm != "sha256":
        raise InvalidSignature(f"{GITHUB_HEADER} is not sha256=<hex>")
    expected = _hmac(secret.encode(), body).hexdigest().encode()
    if not hmac.compare_digest(expected, signature.strip().lower().encode()):
        raise InvalidSignature(f"{GITHUB_HEADER} does not match the secret")
