"""All of a ``BatchGenerator`` step's constraints as one mask, after one wait.

A ``Constraint`` (daemon/constraints.py) is a per-sequence logits processor, and as one,
each constrained row of a batch waits for its own sampled token (a ``tolist`` that forces
an eval), computes its own mask and builds its own ``mx.where``: 16 waits and 16 masks a
step at 16 sequences, which cost 15-25% of the batch's decode throughput on 2 x86 cores
(bench/structured.py's headline; in process, with the two alternating). Here a step does
it once for the batch: one wait for the step's input tokens (every row's last sampled
one), the matchers advanced, their masks filled into one bitmask by llguidance's
``LLExecutor`` (``fill_next_token_bitmask_par``), unpacked once, and applied to the batch's
logits by one ``mx.where``; free rows' mask is all ones, so their logits, and tokens, are
exactly what they would be unmasked.

How: ``install`` wraps mlx-lm's ``GenerationBatch._step`` (present, with the ``model``,
``logits_processors`` and ``tokens`` read here, from mlx-lm 0.31.2 through 0.32.x). A step
with constrained rows runs the original with the batch's ``model`` swapped for a
``_Masking`` one, which masks the forward pass's logits, and with the constraints taken
out of the rows' processors for that call (put back after), so that mlx-lm does not run
them too, and a batch with no other processors keeps mlx-lm's batched path (no per-row
slicing). A row's context is mlx-lm's own list of its tokens (``tokens``) plus the step's
input, as a processor would see it, so a re-fed token after a pause is not consumed
twice. Whatever comes after the mask (a repetition penalty, a logit bias) cannot lift a
-inf. mlx-lm's processor interface has no batch-level hook, and this leaves its loop,
caches and sampling as they are; where ``GenerationBatch`` is not what this expects, nothing
is wrapped and the processors do it all, row by row, as before.

Threading: worker thread only (the executor and the matchers are not shared).
"""

from __future__ import annotations

import functools
from typing import Any

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np

from .constraints import Constraint

_EXECUTOR: llguidance.LLExecutor | None = None
enabled = True
"""Off: every row's processor masks it alone (tests compare the two)."""
stats = {"steps": 0, "rows": 0}
"""Steps masked here and the constrained rows they masked: tests read it."""


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


class _Masking:
    """The batch's model, its logits masked for the constrained ``rows``: (row index, the
    row's constraint, the row's tokens before this step's input, mlx-lm's own list)."""

    def __init__(self, model: Any, rows: list[tuple[int, Constraint, list[int]]]) -> None:
        self.model = model
        self.rows = rows

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        logits = self.model(inputs, cache=cache)
        mx.async_eval(logits)  # the forward pass runs while the host waits and masks
        tokens = inputs.reshape(-1).tolist()  # the one wait: every row's last token
        batch, width = logits.shape[0], logits.shape[-1]
        vocab = self.rows[0][1].vocab_size  # one model: one tokenizer
        bits = np.full((batch, (vocab + 31) // 32), -1, dtype=np.int32)  # free rows: all
        filled: list[tuple[llguidance.LLMatcher, int]] = []
        broken: list[tuple[int, Constraint]] = []
        for e, constraint, history in self.rows:
            n = len(history) + 1  # the context a processor would see: this step's input last
            ahead = constraint.steps_to(n)
            new = [*history[len(history) - ahead + 1 :], tokens[e]] if ahead > 0 else []
            matcher = constraint.advance(n, new)
            if matcher is None:
                broken.append((e, constraint))
            else:
                filled.append((matcher, e))
        if filled:
            llguidance.numpy.fill_next_token_bitmask_par(_executor(), filled, bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :width]
        allowed = allowed.astype(np.bool_)
        if allowed.shape[1] < width:  # logits wider than the tokenizer: padding rows
            pad = np.ones((batch, width - allowed.shape[1]), dtype=np.bool_)
            pad[[e for _, e in filled]] = False
            allowed = np.concatenate([allowed, pad], axis=1)
        for e, constraint in broken:
            allowed[e] = constraint.eos_only(width)
        stats["steps"] += 1
        stats["rows"] += len(self.rows)
        mask = mx.array(allowed)[:, None, :] if logits.ndim == 3 else mx.array(allowed)
        return mx.where(mask, logits, mx.array(-mx.inf, logits.dtype))


_EXPECTED = {"model", "logits_processors", "tokens"}
"""The ``GenerationBatch`` attributes read and swapped here."""


def install() -> bool:
    """Wrap ``GenerationBatch._step`` (once); False where mlx-lm's is not what this expects."""
    try:
        from mlx_lm.generate import GenerationBatch
    except ImportError:
        return False
    step = getattr(GenerationBatch, "_step", None)
    if step is None or getattr(step, "_mlxd_masked", False):
        return step is not None

    @functools.wraps(step)
    def masked_step(self: Any) -> Any:
        processors = getattr(self, "logits_processors", None)
        if not enabled or not any(processors or ()) or not vars(self).keys() >= _EXPECTED:
            return step(self)
        rows, others = [], []
        for e, row in enumerate(processors):
            row = tuple(row or ())
            constraints = [p for p in row if isinstance(p, Constraint)]
            if constraints:
                rows.append((e, constraints[0], self.tokens[e]))
                row = tuple(p for p in row if not isinstance(p, Constraint))
            others.append(row)
        if not rows:
            return step(self)
        model = self.model
        self.model, self.logits_processors = _Masking(model, rows), others
        try:
            return step(self)
        finally:
            self.model, self.logits_processors = model, processors

    masked_step._mlxd_masked = True  # type: ignore[attr-defined]
    GenerationBatch._step = masked_step  # type: ignore[method-assign]
    return True
