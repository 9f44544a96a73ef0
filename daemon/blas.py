"""Which BLAS MLX's CPU matmuls run on (Linux), chosen before MLX is loaded.

The Linux ``mlx[cpu]`` wheel bundles netlib's reference BLAS
(``mlx_cpu.libs/libblas-<hash>.so.3``): 1-5 GFLOP/s, where an optimized BLAS from the
distribution (OpenBLAS, Debian's ``libopenblas0-pthread``) does 50-85 on the same matmuls.
A library in ``LD_PRELOAD`` comes first in the dynamic loader's symbol lookup, so MLX's
``sgemm_`` calls then reach it instead; but the loader reads ``LD_PRELOAD`` only when a
process starts. So ``mlxd serve`` with ``blas = "auto"`` (the default) re-executes itself,
once (``os.execve``: same pid, argv, fds and environment, plus ``LD_PRELOAD``), when all
hold: this is Linux; MLX's library links the reference BLAS; no BLAS is preloaded already;
and an optimized system BLAS is installed (``system_blas``). ``blas = "system"`` preloads
one whatever MLX links, and refuses to start when there is none; ``blas = "bundled"``
never preloads one (the process's own ``LD_PRELOAD``, if it has one, still applies, and
the start-up log says so). On macOS nothing happens: MLX computes on Metal and Accelerate.

How MLX's BLAS is found (``linked_blas``): ``libmlx.so``'s ELF dynamic section is read
from the file (its ``DT_NEEDED`` names, its ``RPATH``/``RUNPATH``), the BLAS among the
names resolved as the loader would (``$ORIGIN`` first, then the usual folders), and the
real path of what that resolves to is classified (a ``libblas.so.3`` that is Debian's
alternatives link to OpenBLAS is OpenBLAS). That is a few small reads and runs none of
MLX's code; importing MLX in a child process to read its ``/proc/PID/maps`` would be exact
too but cost a second of start-up, and ``ldd`` runs the loader over the file and prints
no stable format. Anything unreadable or unrecognised is ``unknown``, and ``auto``
changes nothing then. Whether a preloaded BLAS is in use, the daemon reads from its own
``/proc/self/maps`` (``is_mapped``: that very file, since numpy maps an OpenBLAS of its
own, ``libscipy_openblas64_``, whose prefixed symbols MLX never calls), and it logs a
warning when the loader did not load the one it asked for.

Processes started by one that has decided inherit ``LD_PRELOAD``, so they run the same
BLAS. A program that computes alongside a daemon it starts and needs bit-identical results
(the tests, the benchmarks) starts it with ``MLXD_BLAS=bundled``: the daemon then runs
exactly its parent's BLAS, preloaded or not, and never chooses on its own. The loop guard
is ``REEXEC_ENV``: a process that carries it never re-executes again.

``python -m mlxd.daemon.blas`` prints what it finds and what ``MLXD_BLAS`` (default
``auto``) would do; ``--preload`` prints only the library it would preload (nothing: none;
exit status 3: one is wanted but none is installed), for ``./dev test``.

Threading: the ``mlxd serve`` command's main thread, before anything imports MLX (so
``settings.load`` must not) and before the server starts: ``reexec`` replaces the process,
safe only while it has no other threads and holds nothing but what it inherited.
"""

from __future__ import annotations

import os
import platform
import re
import struct
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import BinaryIO

SETTINGS = ("auto", "system", "bundled")
WARNINGS = ("preload_failed", "reexec_failed")
"""Reasons logged as warnings: mlxd meant to preload a BLAS and could not."""
REEXEC_ENV = "MLXD_BLAS_PRELOADED"
"""Set by ``reexec`` to the library it preloaded: the re-executed process knows why its
``LD_PRELOAD`` holds it, and never re-executes again."""
INSTALL_HINT = (
    "apt-get install libopenblas0-pthread (Debian, Ubuntu); dnf install openblas-threads "
    "(Fedora); pacman -S openblas (Arch)"
)

_BLAS_NAME = re.compile(r"^lib(open)?blas|^libblis|^libmkl|^libflexiblas|^libatlas")
_OPTIMIZED = re.compile(r"openblas|blis|mkl|atlas")


# ---------------------------------------------------------------------- ELF, read by hand


@dataclass(frozen=True, slots=True)
class Elf:
    elf_class: int
    """1: 32-bit, 2: 64-bit."""
    machine: int
    """``e_machine``: 62 x86-64, 183 AArch64."""
    needed: tuple[str, ...]
    search: tuple[str, ...]
    """``RPATH`` then ``RUNPATH`` folders, ``$ORIGIN`` already replaced."""


def read_elf(path: str | Path) -> Elf:
    """The parts of a shared library's header and dynamic section the loader uses to find
    its dependencies. Raises ``ValueError`` for anything that is not a readable ELF."""
    path = Path(path)
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            raise ValueError(f"{path}: not an ELF file")
        is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
        head = "HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"
        _, machine, _, _, phoff, _, _, _, phentsize, phnum, *_ = struct.unpack_from(
            end + head, ident, 16
        )
        segments = []  # (type, offset, vaddr, filesz)
        for i in range(phnum):
            entry = _read_at(f, phoff + i * phentsize, phentsize)
            if is64:
                kind, _, offset, vaddr, _, filesz, *_ = struct.unpack_from(end + "IIQQQQQQ", entry)
            else:
                kind, offset, vaddr, _, filesz, *_ = struct.unpack_from(end + "IIIIIIII", entry)
            segments.append((kind, offset, vaddr, filesz))
        dynamic = next((s for s in segments if s[0] == 2), None)  # PT_DYNAMIC
        if dynamic is None:
            raise ValueError(f"{path}: no dynamic section")
        fmt = end + ("qQ" if is64 else "iI")
        size = struct.calcsize(fmt)
        raw = _read_at(f, dynamic[1], dynamic[3])
        tags: list[tuple[int, int]] = []
        for at in range(0, len(raw) - size + 1, size):
            tag, value = struct.unpack_from(fmt, raw, at)
            if tag == 0:  # DT_NULL
                break
            tags.append((tag, value))
        strtab = next((v for t, v in tags if t == 5), None)  # DT_STRTAB (an address)
        strsz = next((v for t, v in tags if t == 10), 0)  # DT_STRSZ
        load = [s for s in segments if s[0] == 1 and s[2] <= (strtab or 0) < s[2] + s[3]]
        if strtab is None or not load:
            raise ValueError(f"{path}: no string table")
        strings = _read_at(f, strtab - load[0][2] + load[0][1], strsz)

    def text(offset: int) -> str:
        return strings[offset : strings.find(b"\0", offset)].decode("utf-8", "replace")

    origin = str(path.absolute().parent)
    search = [
        folder.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
        for tag in (15, 29)  # DT_RPATH, DT_RUNPATH
        for t, v in tags
        if t == tag
        for folder in text(v).split(":")
        if folder
    ]
    needed = tuple(text(v) for t, v in tags if t == 1)  # DT_NEEDED
    return Elf(ident[4], machine, needed, tuple(search))


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated ELF file")
    return data


def _library_dirs() -> list[str]:
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    return [f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/lib64", "/usr/lib", "/lib"]


# ---------------------------------------------------------------------- the facts


@dataclass(frozen=True, slots=True)
class Linked:
    """The BLAS MLX's library links."""

    kind: str
    """``reference`` (netlib's), ``optimized`` (OpenBLAS, BLIS, MKL, ATLAS) or ``unknown``."""
    library: str | None
    """Where it resolves to, when found."""
    detail: str = ""
    """For ``unknown``: why."""


def mlx_library() -> Path | None:
    """``libmlx.so`` in the installed ``mlx`` package (found, not imported)."""
    spec = find_spec("mlx")  # a namespace package: nothing of MLX's runs
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "lib" / "libmlx.so"
        if candidate.is_file():
            return candidate
    return None


def linked_blas(library: Path | None = None) -> Linked:
    library = library or mlx_library()
    if library is None:
        return Linked("unknown", None, "no libmlx.so in the mlx package")
    try:
        elf = read_elf(library)
    except (OSError, ValueError) as exc:
        return Linked("unknown", None, str(exc))
    name = next((n for n in elf.needed if _BLAS_NAME.search(n)), None)
    if name is None:
        return Linked("unknown", None, f"{library.name} links no BLAS by name")
    found = next(
        (Path(d) / name for d in (*elf.search, *_library_dirs()) if (Path(d) / name).exists()),
        None,
    )
    if found is None:
        return Linked("unknown", None, f"{name} not found")
    real = os.path.realpath(found)
    # Its name, or its folder's (Debian's openblas-pthread/libblas.so.3): not the whole
    # path, which may be a home folder called anything.
    if _OPTIMIZED.search(Path(real).name) or _OPTIMIZED.search(Path(real).parent.name):
        return Linked("optimized", real)
    if Path(real).name.startswith("libblas"):
        return Linked("reference", real)
    return Linked("unknown", real, f"{Path(real).name} is no BLAS this module knows")


def system_candidates() -> list[str]:
    """Where distributions install an optimized BLAS, the preferred first."""
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    deb = f"/usr/lib/{triplet}"
    return [
        f"{deb}/openblas-pthread/libopenblas.so.0",  # Debian, Ubuntu: libopenblas0-pthread
        f"{deb}/openblas-openmp/libopenblas.so.0",  # libopenblas0-openmp
        f"{deb}/libopenblas.so.0",  # the alternatives' choice among Debian's variants
        "/usr/lib64/libopenblasp.so.0",  # Fedora, RHEL: openblas-threads
        "/usr/lib64/libopenblaso.so.0",  # openblas-openmp
        "/usr/lib64/libopenblas_pthreads.so.0",  # openSUSE: libopenblas_pthreads0
        "/usr/lib64/libopenblas.so.0",  # Fedora's single-threaded one
        "/usr/lib/libopenblas.so.0",  # Arch: openblas
        f"{deb}/openblas-serial/libopenblas.so.0",  # libopenblas0-serial: one thread
    ]


def system_blas(candidates: Sequence[str] | None = None, like: Path | None = None) -> str | None:
    """The first installed candidate the loader can put in this process: an ELF of the
    same class and machine as ``like`` (MLX's library), so never a 32-bit one."""
    like = like or mlx_library()
    try:
        want = read_elf(like) if like else None
    except (OSError, ValueError):
        want = None
    for path in system_candidates() if candidates is None else candidates:
        try:
            elf = read_elf(path)
        except (OSError, ValueError):
            continue
        if want is None or (elf.elf_class, elf.machine) == (want.elf_class, want.machine):
            return path
    return None


def preloaded_blas(env: Mapping[str, str]) -> str | None:
    """The first BLAS in ``LD_PRELOAD`` (entries split on spaces and colons)."""
    entries = re.split(r"[\s:]+", env.get("LD_PRELOAD", ""))
    return next((e for e in entries if e and _BLAS_NAME.search(Path(e).name)), None)


def mapped_paths(maps: str | None = None) -> set[str]:
    """The files mapped into this process (``/proc/self/maps``), or those in ``maps``."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    fields = (line.split(None, 5) for line in maps.splitlines())
    return {f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")}


def is_mapped(library: str, paths: set[str]) -> bool:
    return os.path.realpath(library) in paths


# ---------------------------------------------------------------------- the choice


@dataclass(frozen=True, slots=True)
class Decision:
    blas: str
    """``system`` (a preloaded optimized BLAS) or ``bundled`` (the one MLX links)."""
    library: str | None
    reason: str
    """``preloaded`` (mlxd re-executed with it), ``inherited`` (``LD_PRELOAD`` from the
    environment), ``opted_out`` (``blas = "bundled"``), ``mlx_blas_optimized`` /
    ``mlx_blas_unknown`` (``auto`` leaves those alone), ``none_installed``,
    ``cannot_reexec`` (``serve`` called inside another program), ``preload_failed`` (the
    loader did not load it), ``reexec_failed`` (``execve`` failed)."""
    preload: str | None = None
    """Re-execute with this added to ``LD_PRELOAD`` (``reexec``), then decide again."""
    error: str | None = None
    """``blas = "system"`` and none can be used: refuse to start, with this message."""
    detail: str | None = None
    """More on the reason (``reexec_failed``: the error)."""


def decide(
    setting: str,
    env: Mapping[str, str],
    *,
    linked: Linked,
    system: str | None,
    mapped: set[str],
    can_reexec: bool,
) -> Decision:
    """The choice for a Linux process, from the facts (the functions above give them)."""
    pre = preloaded_blas(env)
    marker = env.get(REEXEC_ENV)
    if pre is not None and is_mapped(pre, mapped):
        return Decision("system", pre, "preloaded" if marker == pre else "inherited")
    if pre is not None or marker:
        # The loader refused it (it says why on stderr), or LD_PRELOAD lost it: never loop.
        return Decision("bundled", linked.library, "preload_failed")
    if setting == "bundled":
        return Decision("bundled", linked.library, "opted_out")
    if setting == "auto" and linked.kind != "reference":
        return Decision("bundled", linked.library, f"mlx_blas_{linked.kind}")
    if system is None:
        error = f'blas = "system" but no optimized BLAS is installed: {INSTALL_HINT}'
        return Decision(
            "bundled",
            linked.library,
            "none_installed",
            error=error if setting == "system" else None,
        )
    if not can_reexec:
        return Decision("bundled", linked.library, "cannot_reexec")
    return Decision("system", system, "preloaded", preload=system)


def choose(setting: str, *, can_reexec: bool) -> Decision | None:
    """This process's decision; None off Linux (nothing to choose)."""
    if not sys.platform.startswith("linux"):
        return None
    can_reexec = can_reexec and bool(sys.executable) and bool(getattr(sys, "orig_argv", None))
    return decide(
        setting,
        os.environ,
        linked=linked_blas(),
        system=system_blas(),
        mapped=mapped_paths(),
        can_reexec=can_reexec,
    )


def select(setting: str, *, can_reexec: bool) -> Decision | None:
    """``choose``, and act on it: re-execute (not returning) when it says so. The process
    that comes back from a failed ``execve``, or that was re-executed, gets the decision to
    log; ``REEXEC_ENV`` is then dropped, so the daemon's own children start afresh."""
    decision = choose(setting, can_reexec=can_reexec)
    if decision is not None and decision.preload:
        failed = reexec(decision.preload)
        decision = Decision("bundled", linked_blas().library, "reexec_failed", detail=f"{failed}")
    os.environ.pop(REEXEC_ENV, None)
    return decision


def reexec(library: str) -> OSError:
    """Replace this process with itself, ``library`` added to ``LD_PRELOAD``; returns only
    if ``execve`` failed, with its error."""
    env = dict(os.environ)
    existing = env.get("LD_PRELOAD", "").strip()
    # After the others: one that must come first (a sanitizer's) stays first.
    env["LD_PRELOAD"] = f"{existing}:{library}" if existing else library
    env[REEXEC_ENV] = library
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:
        return exc
    raise AssertionError("unreachable")  # pragma: no cover


def log_fields(decision: Decision, setting: str) -> dict[str, object]:
    fields: dict[str, object] = {
        "blas": decision.blas,
        "library": decision.library,
        "reason": decision.reason,
        "setting": setting,
    }
    if decision.reason == "none_installed":
        fields["hint"] = INSTALL_HINT
    if decision.detail:
        fields["detail"] = decision.detail
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    """What this process would find and do, under ``MLXD_BLAS`` (default ``auto``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    setting = os.environ.get("MLXD_BLAS") or "auto"
    if setting not in SETTINGS:
        print(f"MLXD_BLAS={setting!r}: expected one of {', '.join(SETTINGS)}", file=sys.stderr)
        return 78
    linked, system = linked_blas(), system_blas()
    decision = decide(
        setting, os.environ, linked=linked, system=system, mapped=mapped_paths(), can_reexec=True
    )
    if args == ["--preload"]:  # for ./dev test: the library to preload, if any
        if decision.preload:
            print(decision.preload)
        return 3 if decision.reason == "none_installed" else 0
    print(f"MLX links:    {linked.kind} {linked.library or ''} {linked.detail}".rstrip())
    print(f"system BLAS:  {system or 'none (' + INSTALL_HINT + ')'}")
    print(f"LD_PRELOAD:   {preloaded_blas(os.environ) or 'no BLAS'}")
    then = f"preload {decision.preload}" if decision.preload else decision.reason
    print(f"blas = {setting!r}: {decision.blas} {decision.library or ''} ({then})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
