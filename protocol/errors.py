"""Stable, machine-readable error codes carried by ``Error.code``.

Clients switch on these strings; never rename one. Threading: constants only.
"""

from __future__ import annotations

# Connection-level: the frame could not be read; the server closes the connection after it.
FRAME_TOO_LARGE = "frame_too_large"
INVALID_FRAME = "invalid_frame"
# Message-level: the connection stays open.
INVALID_MESSAGE = "invalid_message"  # not MessagePack, or not a map
UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
HANDSHAKE_REQUIRED = "handshake_required"
UNSUPPORTED_VERSION = "unsupported_version"
INVALID_REQUEST = "invalid_request"  # a field is missing, of the wrong type or out of range
DUPLICATE_ID = "duplicate_id"
TOO_MANY_REQUESTS = "too_many_requests"  # too many requests in flight on this connection
UNKNOWN_MODEL = "unknown_model"
MODEL_LOAD_FAILED = "model_load_failed"
PROMPT_TOO_LONG = "prompt_too_long"
INSUFFICIENT_MEMORY = "insufficient_memory"
OVERLOADED = "overloaded"
PERMISSION_DENIED = "permission_denied"  # the peer is another user
SHUTTING_DOWN = "shutting_down"
WORKER_UNAVAILABLE = "worker_unavailable"
INTERNAL_ERROR = "internal_error"

ALL_CODES: frozenset[str] = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)
)
