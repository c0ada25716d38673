"""The S3 destination's settings (`OUTBOUND_S3_*`): endpoint, credentials, TLS, buckets.

Owns these fields only; the runtime's `Config` composes them and reads the
environment. Batching limits are the core's (`destinations/settings.py`).
Must not import the runtime or another destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbound.destinations.settings import Settings, setting

#: What a send to S3 says when S3 is not enabled.
HOW_TO_ENABLE = (
    "set OUTBOUND_S3_ENDPOINT (with OUTBOUND_S3_ACCESS_KEY and OUTBOUND_S3_SECRET_KEY) to enable S3"
)


@dataclass(frozen=True)
class S3Settings(Settings):
    """Where the S3 destination uploads: enabled when `s3_endpoint` is set.

    `s3_upload_pause` is a testing aid only (the crash tests land kill -9s
    between an object's manifest and its upload, and between its upload and
    the settle of its sends): never set it in production.
    """

    s3_endpoint: str | None = setting(
        "OUTBOUND_S3_ENDPOINT", None, "S3/MinIO endpoint, host:port or URL"
    )
    s3_access_key: str | None = setting("OUTBOUND_S3_ACCESS_KEY", None, "S3 access key")
    s3_secret_key: str | None = setting("OUTBOUND_S3_SECRET_KEY", None, "S3 secret key")
    s3_region: str | None = setting("OUTBOUND_S3_REGION", None, "S3 region")
    s3_secure: bool = setting("OUTBOUND_S3_SECURE", False, "use HTTPS for S3")
    s3_create_buckets: bool = setting(
        "OUTBOUND_S3_CREATE_BUCKETS", False, "create missing buckets instead of failing"
    )
    s3_upload_pause: float = setting(
        "OUTBOUND_S3_UPLOAD_PAUSE",
        0.0,
        "testing aid: seconds each upload pauses just before and just after its PUT (logged)",
    )


def is_enabled(settings: S3Settings) -> bool:
    """Whether the runtime starts this destination."""
    return bool(settings.s3_endpoint)
