"""The signature schemes as pure functions, against their reference implementations.

`hrflow`: the installed hrflow SDK's own `webhooks.handle` must accept what
we sign, and we must accept exactly what it accepts. `standard`: the
examples of the Standard Webhooks reference library's test suite
(standard-webhooks/standard-webhooks, libraries/python/tests). `github`:
the example in GitHub's "Validating webhook deliveries".
"""

import orjson
import pytest
from hrflow import Hrflow
from multidict import CIMultiDict
from signing import github_header, hrflow_header, standard_headers

from wfd.signatures import InvalidSignature, check_secret, verify

# The Standard Webhooks reference examples.
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SW_WRONG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="


def sw_headers(**changes: str | None) -> CIMultiDict:
    headers = {"webhook-id": SW_ID, "webhook-timestamp": str(SW_TIMESTAMP),
               "webhook-signature": SW_SIGNATURE, **changes}
    return CIMultiDict({k: v for k, v in headers.items() if v is not None})


@pytest.mark.parametrize("secret", [SW_SECRET, SW_SECRET.removeprefix("whsec_")])
def test_standard_reference_example_verifies(secret):
    verify("standard", secret, sw_headers(), SW_BODY, now=SW_TIMESTAMP)


def test_standard_header_names_ignore_case():
    headers = CIMultiDict({"Webhook-Id": SW_ID, "WEBHOOK-TIMESTAMP": str(SW_TIMESTAMP),
                           "Webhook-Signature": SW_SIGNATURE})
    verify("standard", SW_SECRET, headers, SW_BODY, now=SW_TIMESTAMP)


@pytest.mark.parametrize("offset", [-300, 300])
def test_standard_accepts_five_minutes_either_way(offset):
    verify("standard", SW_SECRET, sw_headers(), SW_BODY, now=SW_TIMESTAMP + offset)


@pytest.mark.parametrize("headers, body, now, reason", [
    (sw_headers(**{"webhook-signature": SW_WRONG}), SW_BODY, SW_TIMESTAMP, "no v1 signature"),
    (sw_headers(), SW_BODY + b" ", SW_TIMESTAMP, "no v1 signature"),
    (sw_headers(), SW_BODY, SW_TIMESTAMP + 301, "more than 300 s"),
    (sw_headers(), SW_BODY, SW_TIMESTAMP - 301, "more than 300 s"),
    (sw_headers(**{"webhook-id": None}), SW_BODY, SW_TIMESTAMP, "webhook-id"),
    (sw_headers(**{"webhook-timestamp": None}), SW_BODY, SW_TIMESTAMP, "webhook-timestamp"),
    (sw_headers(**{"webhook-signature": None}), SW_BODY, SW_TIMESTAMP, "webhook-signature"),
    (sw_headers(**{"webhook-timestamp": "hello"}), SW_BODY, SW_TIMESTAMP, "not a number"),
    (sw_headers(**{"webhook-id": "msg_other"}), SW_BODY, SW_TIMESTAMP, "no v1 signature"),
    # Only v1 counts: the right signature under another version is not accepted.
    (sw_headers(**{"webhook-signature": "v2," + SW_SIGNATURE[3:]}), SW_BODY, SW_TIMESTAMP,
     "no v1 signature"),
], ids=["wrong", "body-changed", "late", "early", "no-id", "no-timestamp", "no-signature",
        "bad-timestamp", "other-id", "v2"])
def test_standard_refusals(headers, body, now, reason):
    with pytest.raises(InvalidSignature, match=reason):
        verify("standard", SW_SECRET, headers, body, now=now)


def test_standard_any_one_valid_signature_passes_for_rotation():
    """The reference suite's multi-signature example: old and new secret side by side."""
    sigs = ["v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=", SW_SIGNATURE,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="]
    verify("standard", SW_SECRET, sw_headers(**{"webhook-signature": " ".join(sigs)}),
           SW_BODY, now=SW_TIMESTAMP)


def test_standard_signing_helper_matches_the_reference():
    signed = standard_headers(SW_SECRET, SW_BODY, SW_ID, SW_TIMESTAMP)
    assert signed["webhook-signature"] == SW_SIGNATURE


HR_SECRET = "hrflow-webhook-secret"
EVENT = {"type": "profile.parse.success", "origin": "api",
         "message": "profile parsed", "profile": {"key": "abc", "reference": "r-1"}}


def sdk_accepts(secret: str, header: str) -> dict | None:
    """What the hrflow SDK's own verification hands its handler (None: it refused)."""
    seen = []
    client = Hrflow(api_secret="unused", api_user="unused", webhook_secret=secret)
    client.webhooks.setHandler(EVENT["type"], seen.append)
    try:
        client.webhooks.handle(request_headers={"HTTP-HRFLOW-SIGNATURE": header})
    except ValueError:
        return None
    return seen[0]


def test_hrflow_what_we_sign_the_sdk_accepts_and_so_do_we():
    header = hrflow_header(HR_SECRET, orjson.dumps(EVENT))
    assert sdk_accepts(HR_SECRET, header) == EVENT
    verify("hrflow", HR_SECRET, CIMultiDict({"HTTP-HRFLOW-SIGNATURE": header}), b"", now=0)
    # HTTP/2 and proxies lowercase header names.
    verify("hrflow", HR_SECRET, CIMultiDict({"http-hrflow-signature": header}), b"", now=0)


@pytest.mark.parametrize("case", ["wrong-secret", "payload-changed", "not-two-parts",
                                  "missing"])
def test_hrflow_refusals_agree_with_the_sdk(case):
    header = hrflow_header(HR_SECRET, orjson.dumps(EVENT))
    if case == "wrong-secret":
        header = hrflow_header("another-secret", orjson.dumps(EVENT))
    elif case == "payload-changed":
        forged = hrflow_header(HR_SECRET, orjson.dumps({**EVENT, "message": "forged"}))
        header = header.split(".")[0] + "." + forged.split(".")[1]
    elif case == "not-two-parts":
        header = header.split(".")[0]
    headers = CIMultiDict({} if case == "missing" else {"HTTP-HRFLOW-SIGNATURE": header})
    if case != "missing":
        assert sdk_accepts(HR_SECRET, header) is None
    with pytest.raises(InvalidSignature):
        verify("hrflow", HR_SECRET, headers, b"", now=0)


GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_documented_example_verifies():
    assert github_header(GH_SECRET, GH_BODY) == {"X-Hub-Signature-256": GH_SIGNATURE}
    verify("github", GH_SECRET, CIMultiDict({"x-hub-signature-256": GH_SIGNATURE}), GH_BODY,
           now=0)


@pytest.mark.parametrize("header, body", [
    (GH_SIGNATURE, GH_BODY + b"!"),
    (GH_SIGNATURE.replace("sha256", "sha1"), GH_BODY),
    (GH_SIGNATURE[:-1] + "0", GH_BODY),
    (None, GH_BODY),
], ids=["body-changed", "other-algorithm", "wrong", "missing"])
def test_github_refusals(header, body):
    headers = CIMultiDict({} if header is None else {"X-Hub-Signature-256": header})
    with pytest.raises(InvalidSignature):
        verify("github", GH_SECRET, headers, body, now=0)


@pytest.mark.parametrize("scheme, secret, problem", [
    ("standard", "whsec_not base64!", "base64"),
    ("standard", "whsec_", "empty"),
    ("github", "", "empty"),
    ("sha1", "x", "scheme must be one of"),
])
def test_unusable_secrets_are_refused_without_echoing_them(scheme, secret, problem):
    with pytest.raises(ValueError, match=problem) as refused:
        check_secret(scheme, secret)
    assert not secret or secret not in str(refused.value)


def test_refusals_never_carry_the_secret_or_the_expected_signature():
    expected = standard_headers(SW_SECRET, SW_BODY, SW_ID, SW_TIMESTAMP)["webhook-signature"]
    with pytest.raises(InvalidSignature) as refused:
        verify("standard", SW_SECRET, sw_headers(**{"webhook-signature": SW_WRONG}), SW_BODY,
               now=SW_TIMESTAMP)
    message = str(refused.value)
    assert SW_SECRET not in message and expected[3:] not in message
