"""Typed exceptions for the daemon's error codes (see ``mlxd.protocol.errors``)."""

from __future__ import annotations

from mlxd.protocol import Error, errors


class MlxdError(Exception):
    """A request failed; ``code`` is the daemon's stable error code. A code without a
    subclass of its own (``prompt_too_long``, ``insufficient_memory``, ...) is this class."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


class DaemonUnavailableError(MlxdError):
    """No daemon answers on the socket (not running, or the path is wrong)."""


class ConnectionClosedError(MlxdError):
    """The daemon closed the connection (or it broke) before the request ended, or before
    this request was sent: open a new client to go on."""


class PermissionDeniedError(MlxdError):
    """Not a daemon of ours: the socket file belongs to another user (checked by the client
    before it sends anything), or the daemon refused us as another user."""


class RequestTimeoutError(MlxdError, TimeoutError):
    """The blocking client's ``timeout`` passed with no reply; the connection is closed,
    since a frame may have been cut in two. Also a ``TimeoutError``."""


class InvalidRequestError(MlxdError):
    pass


class UnknownModelError(MlxdError):
    pass


class ModelLoadError(MlxdError):
    pass


class OverloadedError(MlxdError):
    pass


class ShuttingDownError(MlxdError):
    pass


_BY_CODE: dict[str, type[MlxdError]] = {
    errors.INVALID_REQUEST: InvalidRequestError,
    errors.UNKNOWN_MODEL: UnknownModelError,
    errors.MODEL_LOAD_FAILED: ModelLoadError,
    errors.OVERLOADED: OverloadedError,
    errors.TOO_MANY_REQUESTS: OverloadedError,
    errors.SHUTTING_DOWN: ShuttingDownError,
    errors.PERMISSION_DENIED: PermissionDeniedError,
}


def error_from(message: Error) -> MlxdError:
    return _BY_CODE.get(message.code, MlxdError)(message.code, message.message, message.field)
