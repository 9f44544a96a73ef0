"""Who may use the HTTP API: where it listens (``parse_listen``), whether it may listen
there (``check_http``: loopback or ``unix:PATH``, else an API key; the key file ours and
0600), and who a loopback TCP peer is on Linux (``tcp_peer_uid``: the kernel's socket
table). No aiohttp here: the CLI checks a configuration before anything binds.

Threading: any (pure functions and file reads); the daemon calls them on main and the loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import sys
from pathlib import Path
from typing import Any


def parse_listen(spec: str) -> tuple[str, int] | Path:
    """``HOST:PORT`` (an IPv6 host in brackets) or ``unix:PATH``."""
    if spec.startswith("unix:"):
        return Path(spec[5:]).expanduser()
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--http {spec!r}: expected HOST:PORT or unix:PATH")
    return host.strip("[]"), int(port)


class HttpRefused(Exception):
    """The HTTP listener must not start as configured; the message is one line."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; any other name or address is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    """The key in ``path``: a regular file of ours that only we can read (0600 or
    tighter), not a symlink; raises ``HttpRefused`` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise HttpRefused(f"api_key_file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise HttpRefused(f"api_key_file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise HttpRefused(f"api_key_file {path} belongs to uid {st.st_uid}, not to us")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise HttpRefused(
                f"api_key_file {path} has mode {mode:04o}: others can read the key; "
                f"chmod 600 {path}"
            )
        key = f.read(4096).decode("utf-8", "replace").strip()
    if not key or any(c.isspace() for c in key):
        raise HttpRefused(f"api_key_file {path} must hold one key (no spaces), not {len(key)}")
    return key


def check_http(config: Any) -> str | None:
    """Whether ``config.http`` may be served: refuses (``HttpRefused``) a bind beyond
    loopback without an API key, and a key file others can read. Returns the key (None:
    none configured). Called before anything binds, and again by ``start_http``."""
    try:
        where = parse_listen(config.http)
    except ValueError as exc:
        raise HttpRefused(str(exc)) from None
    key = read_api_key(config.api_key_file) if config.api_key_file else None
    if isinstance(where, tuple) and key is None and not is_loopback(where[0]):
        raise HttpRefused(
            f"--http {config.http}: {where[0]} is not a loopback address, and no API key is "
            "configured: set api_key_file (--api-key-file, a 0600 file), or bind 127.0.0.1"
        )
    return key


# ---------------------------------------------------------------- who is connecting


def _proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (/proc/net/tcp's host-order words) -> (address, port)."""
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    packed = b"".join(raw[i : i + 4][::-1] if sys.byteorder == "little" else raw[i : i + 4]
                      for i in range(0, len(raw), 4))  # fmt: skip
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(hexport, 16)


def _normal(sockaddr: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(sockaddr[1])


def tcp_peer_uid(peer: Any, ours: Any) -> int | None:
    """The uid owning the other end of a local TCP connection, from the kernel's socket
    table (Linux): the row whose local address is ``peer`` and remote ``ours``."""
    want_local, want_remote = _normal(peer), _normal(ours)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 8:
                continue
            with contextlib.suppress(ValueError):
                if _proc_address(cols[1]) == want_local and _proc_address(cols[2]) == want_remote:
                    return int(cols[7])
    return None
