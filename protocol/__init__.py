"""mlxd's wire protocol: message types, error codes and framing helpers.

Imports only msgspec (no MLX), so editor plugins and tools can use it with the client alone.
See docs/PROTOCOL.md for the language-neutral description.
"""

from . import errors
from .framing import (
    HEADER_SIZE,
    Encoder,
    decode_request,
    decode_server_message,
    frame_length,
)
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .options import *  # noqa: F403
from .options import __all__ as _options_all
from .reports import *  # noqa: F403
from .reports import __all__ as _reports_all
from .tools import *  # noqa: F403
from .tools import __all__ as _tools_all

__all__ = [
    "HEADER_SIZE",
    "Encoder",
    "decode_request",
    "decode_server_message",
    "errors",
    "frame_length",
    *_messages_all,
    *_options_all,
    *_reports_all,
    *_tools_all,
]
