"""The BLAS ``mlxd serve`` runs MLX on (Linux): what it detects, the re-execution into the
system's OpenBLAS, the opt-out, the loop guard, and greedy equality under the other regime.

Daemons here are real ``mlxd serve`` processes; what they run is read from their own
``/proc/PID/maps``. conftest starts every daemon with ``MLXD_BLAS=bundled`` (a daemon runs
exactly the test process's BLAS); the tests here set ``MLXD_BLAS`` and ``LD_PRELOAD``
themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, start_daemon, wait_ready

from mlxd.daemon import blas, service, settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
SYSTEM = blas.system_blas()
needs_openblas = pytest.mark.skipif(SYSTEM is None, reason=f"no OpenBLAS: {blas.INSTALL_HINT}")
LINKED = blas.linked_blas()
needs_reference = pytest.mark.skipif(
    LINKED.kind != "reference", reason=f"MLX links {LINKED.kind} BLAS here"
)
TESTS = Path(__file__).parent
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):"]


def mapped(pid: int) -> set[str]:
    return blas.mapped_paths(Path(f"/proc/{pid}/maps").read_text())


def has_system_blas(paths: set[str]) -> bool:
    # Not "openblas" in a path: numpy's wheel maps its own (libscipy_openblas64_), with
    # prefixed symbols that MLX never calls.
    return SYSTEM is not None and blas.is_mapped(SYSTEM, paths)


def events(d: Daemon, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def serve(model: Path, *args: str, **env: str) -> Daemon:
    """A daemon started without any BLAS preloaded (unless ``env`` says otherwise)."""
    return start_daemon(
        short_tmpdir() / "mlxd.sock", "--model", f"tiny={model}", *args,
        env={"LD_PRELOAD": "", "MLXD_BLAS": "auto", **env},
    )  # fmt: skip


def stop(d: Daemon) -> None:
    try:
        assert d.stop() == 0, d.log()
    finally:
        shutil.rmtree(d.socket.parent, ignore_errors=True)


# ---------------------------------------------------------------------- detection


@needs_reference
def test_mlx_links_the_bundled_reference_blas_and_the_loader_agrees() -> None:
    library = blas.mlx_library()
    assert library is not None
    elf = blas.read_elf(library)
    assert Path(LINKED.library or "").name in elf.needed
    assert "mlx_cpu.libs" in (LINKED.library or "")
    # What the ELF reading says is what the loader loaded into this process.
    import mlx.core  # noqa: F401

    assert os.path.realpath(LINKED.library or "") in blas.mapped_paths()


@needs_openblas
def test_the_system_openblas_is_found_and_loadable() -> None:
    assert SYSTEM is not None and "openblas" in SYSTEM
    mlx = blas.read_elf(blas.mlx_library())  # type: ignore[arg-type]
    found = blas.read_elf(SYSTEM)
    assert (found.elf_class, found.machine) == (mlx.elf_class, mlx.machine)
    # A 32-bit or foreign library is never chosen, however early it comes.
    assert blas.system_blas(["/bin/sh", SYSTEM]) in (SYSTEM, "/bin/sh")
    assert blas.system_blas(["/nonexistent/libopenblas.so.0"]) is None


def test_the_rules() -> None:
    ref = blas.Linked("reference", "/x/libblas.so.3")
    lib = "/usr/lib/libopenblas.so.0"
    real = os.path.realpath(lib)

    def decide(setting: str = "auto", env: dict[str, str] | None = None, **kw: object) -> tuple:
        facts: dict = {"linked": ref, "system": lib, "mapped": set(), "can_reexec": True, **kw}
        d = blas.decide(setting, env or {}, **facts)
        return d.blas, d.reason, d.preload, d.error is not None

    assert decide() == ("system", "preloaded", lib, False)  # re-execute with it
    assert decide("system") == ("system", "preloaded", lib, False)
    assert decide("bundled") == ("bundled", "opted_out", None, False)
    assert decide(linked=blas.Linked("optimized", "/o")) == (
        "bundled",
        "mlx_blas_optimized",
        None,
        False,
    )
    assert decide(linked=blas.Linked("unknown", None)) == (
        "bundled",
        "mlx_blas_unknown",
        None,
        False,
    )
    assert decide(system=None) == ("bundled", "none_installed", None, False)
    assert decide("system", system=None) == ("bundled", "none_installed", None, True)
    assert decide(can_reexec=False) == ("bundled", "cannot_reexec", None, False)
    # Already preloaded and loaded: by mlxd itself (its marker), or by whoever started us,
    # whatever the setting: the process's BLAS is what it is, and nothing re-executes.
    after = {"LD_PRELOAD": lib, blas.REEXEC_ENV: lib}
    assert decide(env=after, mapped={real}) == ("system", "preloaded", None, False)
    for setting in blas.SETTINGS:
        got = decide(setting, env={"LD_PRELOAD": f"/a/libjemalloc.so {lib}"}, mapped={real})
        assert got == ("system", "inherited", None, False)
    # The loop guard: preloaded but not loaded, or the marker without it: never again.
    assert decide(env=after) == ("bundled", "preload_failed", None, False)
    assert decide(env={blas.REEXEC_ENV: lib}) == ("bundled", "preload_failed", None, False)


def test_the_setting_comes_from_the_file_the_environment_or_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('blas = "bundled"\n')
    assert settings.load({}, {}, str(path)).config.blas == "bundled"
    assert settings.load({}, {"MLXD_BLAS": "system"}, str(path)).config.blas == "system"
    loaded = settings.load({"blas": "auto"}, {"MLXD_BLAS": "system"}, str(path))
    assert loaded.config.blas == "auto" and loaded.sources["blas"] == "flag:--blas"
    assert settings.load({}, {}, None).config.blas == "auto"
    with pytest.raises(settings.ConfigError, match="MLXD_BLAS"):
        settings.load({}, {"MLXD_BLAS": "fast"}, str(path))
    assert "blas" in settings.RESTART_KEYS


def test_the_systemd_unit_leaves_the_choice_to_the_daemon() -> None:
    # `mlxd serve` decides at each start: right even after OpenBLAS is installed or removed.
    unit = service.render_service_unit(service.example_target("linux"))
    assert "LD_PRELOAD" not in unit and " serve" in unit


# ---------------------------------------------------------------------- mlxd serve


@needs_reference
@needs_openblas
def test_serve_reexecutes_once_into_the_system_openblas(tiny_model: Path) -> None:
    d = serve(tiny_model)
    try:
        maps = mapped(d.proc.pid)  # the same pid: execve keeps it
        assert os.path.realpath(SYSTEM or "") in maps
        [chosen] = events(d, "blas_selected")
        assert chosen["blas"] == "system" and chosen["reason"] == "preloaded"
        assert chosen["library"] == SYSTEM and chosen["setting"] == "auto"
        assert len(events(d, "config_loaded")) == 1
        environ = Path(f"/proc/{d.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"LD_PRELOAD={SYSTEM}".encode() in environ  # added once
        with d.client() as client:
            assert client.generate("def f():", max_tokens=8).text
    finally:
        stop(d)


@needs_reference
def test_the_opt_out_keeps_the_bundled_blas(tiny_model: Path) -> None:
    d = serve(tiny_model, "--blas", "bundled")  # the flag over MLXD_BLAS=auto
    try:
        maps = mapped(d.proc.pid)
        assert os.path.realpath(LINKED.library or "") in maps
        assert not has_system_blas(maps)
        [chosen] = events(d, "blas_selected")
        assert (chosen["blas"], chosen["reason"]) == ("bundled", "opted_out")
    finally:
        stop(d)


@needs_reference
@needs_openblas
def test_no_reexecution_loop_when_the_preload_did_not_take(tiny_model: Path) -> None:
    # What a re-executed process sees when the loader refused the library: the marker, and
    # no BLAS loaded. It goes on with the bundled one, and says so.
    d = serve(tiny_model, **{blas.REEXEC_ENV: SYSTEM or ""})
    try:
        assert not has_system_blas(mapped(d.proc.pid))
        [chosen] = events(d, "blas_selected")
        assert (chosen["blas"], chosen["reason"], chosen["level"]) == (
            "bundled", "preload_failed", "warning",
        )  # fmt: skip
    finally:
        stop(d)


@needs_reference
@needs_openblas
def test_a_socket_activated_daemon_keeps_its_socket_through_the_reexecution(
    tiny_model: Path,
) -> None:
    from test_service import EXEC_WITH_FD3

    base = short_tmpdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(base / "mlxd.sock"))
    sock.listen(16)
    log_fd, log_name = tempfile.mkstemp(prefix="mlxd-daemon-", suffix=".log")
    env = {k: v for k, v in os.environ.items() if k not in ("MLXD_SOCKET", "LD_PRELOAD")}
    cmd = [
        sys.executable, "-c", EXEC_WITH_FD3, str(sock.fileno()),
        sys.executable, "-m", "mlxd.daemon", "serve", "--model", f"tiny={tiny_model}",
        "--state-dir", str(base / "state"), "--log-format", "json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=log_fd, stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),),
        env={**env, "LISTEN_FDS": "1", "MLXD_BLAS": "auto"},
    )  # fmt: skip
    os.close(log_fd)
    d = Daemon(base / "mlxd.sock", proc, Path(log_name))
    try:
        wait_ready(d)
        assert os.path.realpath(SYSTEM or "") in mapped(proc.pid)
        assert '"manager": "systemd"' in d.log()
    finally:
        stop(d)
        sock.close()


def _other_regime() -> dict[str, str]:
    """The environment of the BLAS regime this test process is not in."""
    here = has_system_blas(blas.mapped_paths())
    return {"LD_PRELOAD": "" if here else (SYSTEM or ""), "MLXD_BLAS": "bundled"}


@needs_openblas
def test_greedy_equality_holds_under_the_other_regime_too(tiny_model: Path) -> None:
    """The suite checks equality under the test process's BLAS; this, under the other one:
    the daemon (batched and alone) against mlx-lm in a child process of that regime."""
    env = _other_regime()
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from helpers import reference; "
        "print(json.dumps([reference(sys.argv[2], p, 24) for p in json.loads(sys.argv[3])]))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(TESTS), str(tiny_model), json.dumps(PROMPTS)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    expected = [tuple(r) for r in json.loads(child.stdout)]
    d = serve(tiny_model, **env)
    try:
        assert has_system_blas(mapped(d.proc.pid)) == bool(env["LD_PRELOAD"])
        with d.client() as client:
            alone = [client.generate(p, max_tokens=24) for p in PROMPTS]

        def one(prompt: str) -> tuple[str, list[int]]:
            with d.client() as c:
                done = c.generate(prompt, max_tokens=24)
                return done.text, done.tokens

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            batched = list(pool.map(one, PROMPTS))
    finally:
        stop(d)
    assert [(a.text, a.tokens) for a in alone] == expected
    assert batched == expected
