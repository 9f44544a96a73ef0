"""``mlxd serve --distributed``: one model sharded across two ranks over loopback (MLX's
ring backend on the CPU), each rank a real ``mlxd serve`` process started as ``mlx.launch``
starts them (``MLX_HOSTFILE``, ``MLX_RANK``), so a test can kill or signal one alone.

Greedy output through rank 0 equals single-process mlx-lm's, token for token: single
requests, 8 at once (one batch, stepped in lockstep), a cache hit, a trim, and a stream
cancelled then asked again. The model is the tiny test model in float32: a sharded pass
sums its partial products across the ranks in another order than one process does, and
in bfloat16 that rounding alone flips a greedy token now and then (in float32 it would
take a near-tie). A follower that dies makes rank 0's clients get an error and
both ranks exit non-zero within the stall timeout; SIGTERM on rank 0 stops both with 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, short_tmpdir
from helpers import reference

from mlxd.client import Chunk, Client, DaemonUnavailableError, MlxdError

STALL_S = 4


@dataclass
class Ranks:
    socket: Path
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def client(self) -> Client:
        return Client(self.socket)

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait(self, timeout: float = 60) -> list[int | None]:
        codes = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def start_ranks(
    models: list[list[str]], wait: bool = True, faults: tuple[str, str] = ("", "")
) -> Ranks:
    """Two ranks; ``models[rank]``: that rank's ``--model`` values; ``faults[rank]``: its
    ``MLXD_FAULTS``."""
    folder = short_tmpdir()
    hosts = folder / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    config = folder / "config.toml"
    config.write_text("")
    socket = folder / "mlxd.sock"
    procs, logs = [], []
    for rank in (0, 1):
        env = {**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(rank),
               "MLXD_CONFIG": str(config), "MLXD_FAULTS": faults[rank]}  # fmt: skip
        cmd = [sys.executable, "-m", "mlxd.daemon", "serve", "--distributed",
               "--socket", str(socket), "--state-dir", str(folder / f"state-{rank}"),
               "--log-format", "json", "--stall-timeout", str(STALL_S)]  # fmt: skip
        for m in models[rank]:
            cmd += ["--model", m]
        log = folder / f"rank-{rank}.log"
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    ranks = Ranks(socket, procs, logs)
    if wait:
        deadline = time.monotonic() + 120
        while True:
            if any(p.poll() is not None for p in procs):
                ranks.kill()
                raise RuntimeError(f"a rank exited:\n{ranks.log(0)}\n{ranks.log(1)}")
            try:
                with ranks.client() as c:
                    c.ping()
                break
            except (DaemonUnavailableError, OSError):
                if time.monotonic() > deadline:
                    ranks.kill()
                    raise
                time.sleep(0.1)
    return ranks


@pytest.fixture(scope="module")
def model32(tiny_model: Path, models_root: Path) -> Path:
    """The tiny model with its weights in float32."""
    import shutil

    import mlx.core as mx

    out = models_root / "tiny-float32"
    if not (out / "config.json").exists():
        shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("*.safetensors"))
        weights = mx.load(str(tiny_model / "model.safetensors"))
        mx.save_safetensors(
            str(out / "model.safetensors"),
            {k: v.astype(mx.float32) for k, v in weights.items()},
            metadata={"format": "mlx"},
        )
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    return out


@pytest.fixture(scope="module")
def ranks(model32: Path) -> Iterator[Ranks]:
    r = start_ranks([[f"tiny={model32}"]] * 2)
    yield r
    r.procs[0].send_signal(signal.SIGTERM)
    codes = r.wait(60)
    r.kill()
    assert codes == [0, 0], f"{codes}\n{r.log(0)[-2000:]}\n{r.log(1)[-2000:]}"


PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def", "x = [1, 2,"]


def test_greedy_output_equals_single_process_mlx_lm(ranks: Ranks, model32: Path) -> None:
    with ranks.client() as c:
        for prompt in PROMPTS:
            r = c.generate(prompt, max_tokens=24, cache=False)
            assert r.tokens == reference(model32, prompt, 24)[1], prompt


def test_eight_at_once_are_one_batch_and_each_is_mlx_lm_s(ranks: Ranks, model32: Path) -> None:
    prompts = [f"{p} # {i}" for i, p in enumerate(PROMPTS * 2)]
    got: dict[str, list[int]] = {}

    def run(prompt: str) -> None:
        with ranks.client() as c:
            got[prompt] = c.generate(prompt, max_tokens=20, cache=False).tokens

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt in prompts:
        assert got[prompt] == reference(model32, prompt, 20)[1], prompt


def test_a_cache_hit_and_a_trim_give_mlx_lm_s_tokens(ranks: Ranks, model32: Path) -> None:
    from helpers import _load

    _, tokenizer = _load(str(model32))
    base = tokenizer.encode("def area(width, height):\n    return width * height\n\n")
    more = base + tokenizer.encode("def volume(", add_special_tokens=False)
    other = base[:-3] + tokenizer.encode("# next", add_special_tokens=False)
    with ranks.client() as c:
        c.clear_cache()
        c.warm(tokens=base)  # stored under exactly these tokens
        hit = c.generate(tokens=more, max_tokens=16)  # they and more
        trim = c.generate(tokens=other, max_tokens=16)  # diverges inside them
    assert hit.done.cache.kind == "shorter" and hit.done.usage.cached_tokens == len(base)
    assert hit.tokens == reference(model32, more, 16)[1]
    assert trim.done.cache.kind == "longer" and trim.done.usage.cached_tokens > 0
    assert trim.tokens == reference(model32, other, 16)[1]


def test_a_cancelled_stream_asked_again_resumes_from_the_cache(ranks: Ranks, model32: Path) -> None:
    prompt = "while True:\n    line = input()\n"
    with ranks.client() as c:
        c.clear_cache()
        seen: list[int] = []
        for message in c.stream(prompt, max_tokens=400):
            if isinstance(message, Chunk):
                seen += message.tokens
                if len(seen) >= 8:
                    break  # the client's cancel
        again = c.generate(prompt, max_tokens=30)
    expected = reference(model32, prompt, 30)[1]
    assert seen[:8] == expected[:8]
    assert again.done.usage.cached_tokens > 0
    assert again.tokens == expected


def test_a_follower_that_dies_fails_rank_0_s_clients_and_both_exit_nonzero(
    tiny_model: Path,
) -> None:
    r = start_ranks([[f"tiny={tiny_model}"]] * 2)
    try:
        failure: list[BaseException] = []

        def stream() -> None:
            try:
                with r.client() as c:
                    for _ in c.stream("def f():", max_tokens=3000, cache=False):
                        pass
            except (MlxdError, OSError) as exc:
                failure.append(exc)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.5)
        r.procs[1].kill()
        t.join(STALL_S * 3)
        assert failure, "the stream ended without an error"
        began = time.monotonic()
        codes = r.wait(STALL_S * 3)
        assert codes[0] not in (None, 0), f"{codes}\n{r.log(0)[-3000:]}"
        assert time.monotonic() - began < STALL_S * 2
    finally:
        r.kill()


def test_ranks_with_different_models_refuse_to_start(tiny_model: Path, tiny_model_b: Path) -> None:
    r = start_ranks([[f"tiny={tiny_model}"], [f"tiny={tiny_model_b}"]], wait=False)
    try:
        codes = r.wait(120)
        assert codes == [78, 78], f"{codes}\n{r.log(0)}\n{r.log(1)}"
        assert "differs from rank 0" in r.log(1)
        assert not r.socket.exists()
    finally:
        r.kill()


def test_distributed_without_other_ranks_refuses_to_start(tiny_model: Path) -> None:
    folder = short_tmpdir()
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--distributed",
         "--socket", str(folder / "s.sock"), "--model", f"tiny={tiny_model}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 78 and "only rank" in out.stderr, out.stderr


def test_a_follower_that_stalls_makes_rank_0_say_so_and_exit_nonzero(model32: Path) -> None:
    r = start_ranks([[f"tiny={model32}"]] * 2)
    try:
        with r.client() as c:
            c.generate("x", max_tokens=2)
        done = threading.Event()

        def stream() -> None:
            try:
                with r.client() as c:
                    for _ in c.stream("def f():", max_tokens=3000, cache=False):
                        pass
            except (MlxdError, OSError):
                pass
            done.set()

        threading.Thread(target=stream, daemon=True).start()
        time.sleep(1.0)
        r.procs[1].send_signal(signal.SIGSTOP)  # alive, but no longer in the rounds
        began, busy = time.monotonic(), 0.0
        while r.procs[0].poll() is None and time.monotonic() - began < STALL_S * 3:
            try:
                with r.client() as c:
                    busy = max(busy, c.health().worker_busy_s)
            except (MlxdError, OSError):
                pass
            time.sleep(0.5)
        assert r.procs[0].poll() not in (None, 0), r.log(0)[-2000:]
        assert time.monotonic() - began < STALL_S * 2.5
        assert busy >= STALL_S / 2  # health showed the round stuck before the exit
        assert '"worker_stalled"' in r.log(0)
        assert done.wait(10)  # its client was told
    finally:
        r.procs[1].send_signal(signal.SIGCONT)
        r.kill()


SHARDED_REFERENCE = """
import json, sys
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load
group = mx.distributed.init()
model, tokenizer = sharded_load(sys.argv[1])
out = {}
for prompt in json.loads(sys.argv[2]):
    ids = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24)]
    out[prompt] = [t for t in ids if t not in tokenizer.eos_token_ids]
if group.rank() == 0:
    print(json.dumps(out))
"""


def test_in_bfloat16_the_output_is_mlx_lm_s_own_sharded_generation(tiny_model: Path) -> None:
    """In bfloat16 a sharded pass may round a greedy token differently from one process;
    the daemon's two ranks still give exactly what mlx-lm's own sharded generation gives:
    the lockstep adds nothing to the arithmetic."""
    folder = short_tmpdir()
    hosts = folder / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARDED_REFERENCE, str(tiny_model), json.dumps(PROMPTS)],
            env={**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    expected = json.loads(procs[0].communicate(timeout=120)[0])
    assert procs[1].wait(60) == 0
    r = start_ranks([[f"tiny={tiny_model}"]] * 2)
    try:
        with r.client() as c:
            for prompt in PROMPTS:
                assert c.generate(prompt, max_tokens=24, cache=False).tokens == expected[prompt]
    finally:
        r.procs[0].send_signal(signal.SIGTERM)
        assert r.wait(60) == [0, 0]
        r.kill()


def test_a_follower_that_diverges_stops_at_once_and_rank_0_with_it(model32: Path) -> None:
    # The follower skips one command, a clear_cache (no forward pass: the collectives stay
    # in step), so its prompt cache keeps an entry rank 0's dropped. The next round's digest
    # shows it: the follower must stop, not serve on with a cache rank 0 does not have.
    r = start_ranks([[f"tiny={model32}"]] * 2, faults=("", "drop_command@3"))
    try:
        with r.client() as c:
            c.generate("x", max_tokens=4)  # round 2: an entry, on both
            c.clear_cache()  # round 3: rank 0 only
            with pytest.raises((MlxdError, OSError)):
                c.generate("y", max_tokens=4)
        codes = r.wait(STALL_S * 3)
        assert codes[1] == 1 and "diverged from rank 0" in r.log(1), r.log(1)[-2000:]
        assert codes[0] not in (None, 0), r.log(0)[-2000:]
    finally:
        r.kill()
