"""README.md keeps its promises: every fenced code block runs as written against the demo
daemon, or is listed in ``NOT_RUN`` below with the reason it cannot (issue 15, item 10).

What happens to a block depends on its language (the word after the opening fence):

- ``python``: run as a script by this Python, in an empty folder.
- ``sh``, ``bash``: run by ``bash -euo pipefail`` from the repository root (``.venv/bin/mlxd``
  works as written; a bare ``mlxd`` is this Python's), where ``curl`` fails on an HTTP error
  status (``--fail-with-body``) instead of exiting 0. ``console``: its ``$ `` lines, so.
- ``toml``, ``yaml``: parsed; the mlxd configuration file (a first line naming
  ``mlxd/config.toml``) is checked against mlxd's own schema for the file.
- any other (none: sample output, a file tree): never run; it must be in ``NOT_RUN``.

``NOT_RUN`` maps how a block's first line starts to the reason it is not run.

Every block that runs sees one daemon: the built-in demo model as ``demo``, the name
``mlxd serve`` with no model serves it as (checked below), on ``MLXD_SOCKET``. The README's
tool examples name their model ``coder`` and the HTTP port 8642, as a user's set-up would:
the daemon serves the demo model as ``coder`` too, and each block is run with a free port
put in place of ``127.0.0.1:8642``, so parallel runs do not clash.

**Adding a block to the README:** make it run here as written (a client command, a
snippet for the demo daemon), or, when it cannot (it sets a machine up, starts or installs
a service, needs the network, macOS or minutes), add the start of its first line to
``NOT_RUN`` with the reason. A block is run or listed as a whole: give a runnable command a
block of its own rather than hiding it in a listed one. An entry that matches no block
fails the test too, so the list stays true. (The second half of this file checks the
README's figures against the code: item 19.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import yaml
from conftest import HttpDaemon, short_tmpdir, start_http_daemon

from mlxd.daemon import settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PORT = "127.0.0.1:8642"

NOT_RUN: dict[str, str] = {
    # how the block's first line starts -> why this test does not run it
    "./dev demo": "set-up: creates .venv and starts a daemon of its own",
    "mlxd pull mlx-community/": (
        "needs the network (the Hugging Face Hub); tests/test_hub.py runs pull, models --cached "
        "and an offline serve against a stand-in hub"
    ),
    ".venv/bin/mlxd serve --model coder=~/models/qwen-coder": (
        "starts a daemon, on real models a test machine does not have"
    ),
    "blas_selected  blas=system": "sample output (a log line); tests/test_blas.py checks it",
    ".venv/bin/mlxd service install": (
        "installs and starts a launchd/systemd service; tests/test_service.py covers it"
    ),
    "mlxd: error: invalid_config:": "sample output (an error); tests/test_config.py checks it",
    "protocol/      mlxd.protocol": "a file tree, not code",
    "./dev test": "runs the whole test suite (minutes)",
    ".venv/bin/python bench/single_stream.py": "benchmarks: minutes each",
    "mlx.distributed_config --verbose": (
        "needs two Macs (Thunderbolt or Ethernet); tests/test_distributed.py runs two ranks "
        "over loopback as mlx.launch starts them"
    ),
    "mlx.launch -n 2 --backend ring": (
        "starts two daemon ranks in the foreground; tests/test_distributed.py starts them the "
        "same way (MLX_HOSTFILE, MLX_RANK), to kill or signal one"
    ),
    ".venv/bin/python -m mlxd.daemon.demo_train": (
        "trains the demo model (minutes); tests/test_demo_trained.py checks the shipped one"
    ),
}

RUN_LANGUAGES = {"python", "sh", "bash", "console"}
PARSE_LANGUAGES = {"toml", "yaml"}


@dataclass(frozen=True)
class Block:
    line: int
    """The line of its opening fence, counted from 1."""
    language: str
    text: str

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")

    def __str__(self) -> str:
        return f"README.md:{self.line} ```{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks, also those indented in a list item (their indent taken off)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^( *)(`{3,})(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ *{fence}\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"README.md:{i + 1}: a code block never closed"
        blocks.append(Block(i + 1, language, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def listed(block: Block) -> bool:
    return any(block.first_line.startswith(start) for start in NOT_RUN)


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.language in RUN_LANGUAGES and not listed(b)]
PARSE = [b for b in BLOCKS if b.language in PARSE_LANGUAGES and not listed(b)]


def test_every_block_is_run_or_listed_with_a_reason() -> None:
    unlisted = [
        f"{b}: {b.first_line!r}"
        for b in BLOCKS
        if b.language not in RUN_LANGUAGES | PARSE_LANGUAGES and not listed(b)
    ]
    assert not unlisted, (
        "README blocks neither run nor listed: give them a language this test runs, or add "
        "the start of their first line to NOT_RUN in tests/test_readme.py, with the reason:\n"
        + "\n".join(unlisted)
    )
    stale = [s for s in NOT_RUN if not any(b.first_line.startswith(s) for b in BLOCKS)]
    assert not stale, f"NOT_RUN entries that match no README block (remove or fix): {stale}"
    assert RUN, "no README block runs at all"


def test_the_demo_daemon_serves_its_model_as_demo() -> None:
    # What `mlxd serve` with no model and no configuration serves: the name the blocks use.
    with tempfile.NamedTemporaryFile(suffix=".toml") as empty:
        config = settings.load(env={"MLXD_CONFIG": empty.name}).config
    assert list(config.models) == ["demo"] and config.default_model_name() == "demo"


@pytest.fixture(scope="module")
def demo_daemon() -> Iterator[HttpDaemon]:
    from mlxd.daemon.demo_model import build_demo_model

    models = short_tmpdir()
    demo = build_demo_model(models / "demo", size="demo")
    d = start_http_daemon("--model", f"demo={demo}", "--model", f"coder={demo}")
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    shutil.rmtree(models, ignore_errors=True)
    assert code == 0, d.log()


def block_env(d: HttpDaemon, workdir: Path) -> dict[str, str]:
    config = workdir / "config.toml"  # empty: the user's own configuration stays out
    config.touch()
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "MLXD_SOCKET": str(d.socket),
        "MLXD_CONFIG": str(config),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


SH_PRELUDE = 'curl() { command curl --silent --show-error --fail-with-body "$@"; }\n'


@pytest.mark.parametrize("block", RUN, ids=str)
def test_a_readme_block_runs_as_written(block: Block, demo_daemon: HttpDaemon) -> None:
    port = demo_daemon.base_url.rsplit(":", 1)[1]
    text = block.text.replace(DOC_PORT, f"127.0.0.1:{port}")
    workdir = Path(tempfile.mkdtemp(prefix="mlxd-readme-"))
    try:
        env = block_env(demo_daemon, workdir)
        if block.language == "python":
            cmd, cwd = [sys.executable, "-c", text], workdir
        else:
            if block.language == "console":
                text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
            cmd, cwd = ["bash", "-euo", "pipefail", "-c", SH_PRELUDE + text], ROOT
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert done.returncode == 0, (
        f"{block} failed (exit {done.returncode}); mend it, or if it cannot run in a test, list "
        f"it in NOT_RUN (tests/test_readme.py) with the reason:\n{text}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )


@pytest.mark.parametrize("block", PARSE, ids=str)
def test_a_readme_config_block_parses(block: Block) -> None:
    if block.language == "yaml":
        assert yaml.safe_load(block.text) is not None
        return
    parsed = settings.tomllib.loads(block.text)
    if "mlxd/config.toml" in block.first_line:
        msgspec.convert(parsed, settings.FileSchema)  # raises on an unknown key or a bad value


# ---------------------------------------------------------------- the README's figures
# What the README says of defaults and choices is what the code does (issue 15, item 19).

README_TEXT = README.read_text(encoding="utf-8")
PROSE = " ".join(README_TEXT.split())
"""The README with its line breaks as spaces: a sentence found however it is wrapped."""


def _config_block() -> str:
    return next(b.text for b in BLOCKS if "mlxd/config.toml" in b.first_line)


def test_the_readme_states_the_default_budgets() -> None:
    from mlxd.daemon.config import (
        default_cache_budget,
        default_memory_budget,
        physical_memory_bytes,
    )

    ram = physical_memory_bytes()
    memory = round(100 * default_memory_budget() / ram)
    cache = round(100 * default_cache_budget() / ram)
    lines = {ln.split("=")[0].strip(): ln for ln in _config_block().splitlines() if "=" in ln}
    assert f"# default: {memory}% of RAM;" in lines["memory_budget"]
    assert f"# default: {cache}% of RAM;" in lines["max_bytes"]
    assert f"Unset, `memory_budget` is {memory}% of the machine's RAM" in PROSE
    assert f"`cache.max_bytes` is {cache}% of RAM" in PROSE


def test_the_readme_lists_every_demo_model_size() -> None:
    from mlxd.daemon.demo_model import SIZES

    help_text = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "demo-model", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = re.search(r"--size \{([^}]*)\}", help_text)
    assert found, help_text
    choices = found.group(1).split(",")
    assert set(choices) == {"trained", *SIZES}  # trained: the shipped one, the rest random
    listed = "\\|".join(choices)  # as a Markdown table cell writes "|"
    assert f"mlxd demo-model --out DIR [--size {listed}]" in README_TEXT
    for size in choices:
        assert f"`{size}` (" in README_TEXT, f"the README does not describe --size {size}"


def test_the_readme_states_the_linux_socket_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxd.daemon.service import build_target
    from mlxd.protocol.paths import default_socket_path

    monkeypatch.delenv("MLXD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert default_socket_path() == Path(f"/tmp/mlxd-{os.getuid()}/mlxd.sock")
    assert "`/tmp/mlxd-$UID/mlxd.sock` where `XDG_RUNTIME_DIR` is unset" in PROSE
    unit = build_target("linux", "/home/you", program=["/home/you/.venv/bin/mlxd"])
    assert unit.socket == "%t/mlxd/mlxd.sock"
    assert "On Linux the units' socket is `%t/mlxd/mlxd.sock`" in PROSE
