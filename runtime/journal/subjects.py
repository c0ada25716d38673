"""User strings made safe as NATS subject tokens and KV keys: `subject_token`.

Node ids (and, in the cluster issues, workflow ids) end up in subjects and
KV keys, where `.` separates tokens, `*` and `>` are wildcards, and spaces
end a subject. A string made only of letters, digits, `_` and `-` (not
starting with `_`) is its own token; any other is `_` and its UTF-8 bytes in
hex: readable when plain, safe and unambiguous always. Must not import the
rest of the runtime.
"""

from __future__ import annotations

import re

_PLAIN = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_-]*")


def subject_token(text: str) -> str:
    """`text` as one subject token (and KV key); different texts give different tokens."""
    if _PLAIN.fullmatch(text):
        return text
    return "_" + text.encode("utf-8", "surrogatepass").hex()


def text_of(token: str) -> str:
    """The text a `subject_token` came from."""
    if token.startswith("_"):
        return bytes.fromhex(token[1:]).decode("utf-8", "surrogatepass")
    return token
