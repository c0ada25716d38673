"""Standard Webhooks signatures: the secrets (`whsec_<base64>`) and the headers they sign.

Owns `SigningKeys` (one or more secrets, several at once while a receiver
rotates), the reading of `OUTBOUND_HTTP_SIGNING_SECRETS` (`signing_setting`,
checked when the `Config` is made) and of a per-send `signing_secret=`
(`check_signing_secret`, a `SendError` at the call), and `signature_headers`,
the `webhook-id` / `webhook-timestamp` / `webhook-signature` of one attempt
(https://www.standardwebhooks.com: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`,
one per active secret, space-separated).

Secrets stay out of sight: a `SigningKeys`' dataclass fields (what `repr`,
`dataclasses.asdict`, delivery records and dead-letter files see) are only
the secrets' fingerprints; the key bytes live beside them and are reached
only by `signature_headers`. Pickle, which the journal uses, keeps them: a
send recovered after a crash, or taken over by another node, is still signed
with its own secret (see README, "Signed requests"). Errors name the setting
and the position of a bad secret, never its text. Pure: no I/O; must not
import the runtime or another destination.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from outbound.destinations.validation import SendError

#: The environment variable of the secrets `ctx.send.http(..., sign=True)` signs with.
SECRETS_VARIABLE = "OUTBOUND_HTTP_SIGNING_SECRETS"
SECRET_PREFIX = "whsec_"
#: Headers a signed request sets itself: a send that is signed may not set them too.
SIGNATURE_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})
_SECRET_RULE = f"must be {SECRET_PREFIX} followed by base64 (Standard Webhooks)"


@dataclass(frozen=True, eq=False)
class SigningKeys:
    """Active Standard Webhooks secrets: each one adds a `v1,...` signature to a request.

    Its one field is the secrets' fingerprints (`whsec_sha256:<12 hex>`), so
    its repr and its dead-letter form name the secrets without revealing them;
    the key bytes are kept beside the fields (`_keys`). Made by `from_text`.
    """

    fingerprints: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str, field: str) -> SigningKeys:
        """`whsec_<base64>`, or several comma-separated; ValueError naming `field` and the rule."""
        parts = [part.strip() for part in text.split(",")]
        keys = []
        for position, part in enumerate(parts, 1):
            key = _decode_secret(part)
            if key is None:
                where = f" (secret {position} of {len(parts)})" if len(parts) > 1 else ""
                raise ValueError(f"{field}{where} {_SECRET_RULE}; comma-separate several")
            keys.append(key)
        signing = cls(tuple(_fingerprint(key) for key in keys))
        object.__setattr__(signing, "_keys", tuple(keys))  # beside the fields, not one of them
        return signing

    @property
    def keys(self) -> tuple[bytes, ...]:
        """The secrets' key bytes (what HMAC signs with)."""
        keys: tuple[bytes, ...] = self.__dict__.get("_keys", ())
        return keys


def _decode_secret(text: str) -> bytes | None:
    if not text.startswith(SECRET_PREFIX):
        return None
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


def _fingerprint(key: bytes) -> str:
    return f"{SECRET_PREFIX}sha256:{hashlib.sha256(key).hexdigest()[:12]}"


def signing_setting(value: Any) -> SigningKeys | None:
    """`OUTBOUND_HTTP_SIGNING_SECRETS` (or `Config(http_signing_secrets=...)`) as `SigningKeys`.

    Text is read as comma-separated `whsec_` secrets; a bad one raises
    ValueError naming the variable (so a `Config` with it cannot be made).
    """
    if value is None or isinstance(value, SigningKeys):
        return value
    if isinstance(value, list | tuple):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"{SECRETS_VARIABLE} {_SECRET_RULE}, got a {type(value).__name__}")
    if not value.strip():
        return None
    return SigningKeys.from_text(value, SECRETS_VARIABLE)


def check_signing(
    configured: SigningKeys | None, sign: Any, signing_secret: Any
) -> SigningKeys | None:
    """`ctx.send.http(..., sign=, signing_secret=)`: the send's own keys, or None (configured).

    `signing_secret` signs with that secret (or comma-separated secrets) in
    place of the configured ones; `sign=True` alone needs
    `OUTBOUND_HTTP_SIGNING_SECRETS`. Raises `SendError` naming the field.
    """
    if sign is not True and sign is not False:
        raise SendError("http", "sign", "must be True or False")
    if signing_secret is not None:
        if not isinstance(signing_secret, str):
            raise SendError("http", "signing_secret", _SECRET_RULE)
        return _send_secret(signing_secret)
    if sign and configured is None:
        raise SendError(
            "http",
            "sign",
            f"needs a secret: set {SECRETS_VARIABLE} (whsec_..., comma-separated) "
            "or pass signing_secret='whsec_...'",
        )
    return None


@functools.lru_cache(maxsize=1024)
def _send_secret(text: str) -> SigningKeys:
    """A per-send secret, read once per distinct text (a workflow sends with the same few)."""
    try:
        return SigningKeys.from_text(text, "signing_secret")
    except ValueError:
        raise SendError("http", "signing_secret", _SECRET_RULE) from None


def signature_headers(
    keys: SigningKeys, message_id: str, timestamp: int, body: bytes | None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one `v1,` signature per key."""
    signed = f"{message_id}.{timestamp}.".encode() + (body or b"")
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode("ascii")
        for key in keys.keys
    )
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }
