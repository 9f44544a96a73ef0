"""mlxd's Python client: async (anyio) and blocking APIs over the daemon's Unix socket.

Needs only msgspec and anyio, never MLX: a tool or plugin can use it alone.
"""

from mlxd.protocol import Chunk, Done, ModelInfo, Progress, ServerStats

from ._common import Completion
from .aio import AsyncClient, GenerationStream
from .exceptions import (
    ConnectionClosedError,
    DaemonUnavailableError,
    InvalidRequestError,
    MlxdError,
    ModelLoadError,
    OverloadedError,
    PermissionDeniedError,
    RequestTimeoutError,
    ShuttingDownError,
    UnknownModelError,
)
from .sync import Client

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "Completion",
    "ConnectionClosedError",
    "DaemonUnavailableError",
    "Done",
    "GenerationStream",
    "InvalidRequestError",
    "MlxdError",
    "ModelInfo",
    "ModelLoadError",
    "OverloadedError",
    "PermissionDeniedError",
    "Progress",
    "RequestTimeoutError",
    "ServerStats",
    "ShuttingDownError",
    "UnknownModelError",
]
