"""What running work is charged in the memory budget (daemon/memory.py): a generator's
bytes for the sequences it runs, the live total by model, and what starting one more
sequence adds (its own KV and scratch, the padding it gives a batch, and the move of a
sequence running alone into the batch it starts).

The byte model itself (``generator_bytes``) is memory.py's; this module applies it to
``Sequences``' batches, which it only reads.

Threading: worker thread only.
"""

from __future__ import annotations

from .config import Config
from .kv_quant import quantized_bytes_per_token
from .memory import Footprint, generator_bytes
from .models import LoadedModel
from .running import Batch
from .sequences import Sequences


def batch_bytes(batch: Batch, config: Config, extra: Footprint | None = None) -> tuple[int, int]:
    """(KV, scratch) bytes ``batch``'s generator may hold, with ``extra`` joining it."""
    step = config.prefill_step_size
    sequences = [s.footprint(step) for s in batch.sequences.values()]
    if extra is not None:
        sequences.append(extra)
    group = min(config.prefill_batch_size, config.max_batch_size)
    quantized = _quantized(batch.model, config) if batch.solo else None
    return generator_bytes(batch.model, sequences, group, not batch.solo, quantized)


def _quantized(loaded: LoadedModel, config: Config) -> int | None:
    """Bytes a token of ``loaded``'s KV costs when it runs alone quantized (its
    ``kv_bits``); None when it runs plain."""
    opts = config.options(loaded.name)
    if opts.kv_bits is None:
        return None
    return quantized_bytes_per_token(loaded, opts.kv_bits, opts.kv_group_size)


def live_bytes(sequences: Sequences) -> dict[str, tuple[int, int]]:
    """(KV, scratch) bytes set aside for the running sequences, by model."""
    live: dict[str, tuple[int, int]] = {}
    for batch in sequences.batches.values():
        if batch.sequences:
            kv, scratch = batch_bytes(batch, sequences.config)
            had = live.get(batch.model.name, (0, 0))
            live[batch.model.name] = (had[0] + kv, had[1] + scratch)
    return live


def added_bytes(sequences: Sequences, loaded: LoadedModel, footprint: Footprint, solo: bool) -> int:
    """Bytes a new sequence of ``loaded`` with ``footprint`` adds: its own KV and scratch
    on a generator of its own (``solo``), or its share of the model's batch, with the
    padding it gives the others; starting the batch also moves a sequence running alone
    into it (``Sequences.merge_solo``), at the cost of that sequence's batched footprint."""
    if solo:
        quantized = _quantized(loaded, sequences.config)
        return sum(generator_bytes(loaded, [footprint], 1, False, quantized))
    config = sequences.config
    batch = sequences.joinable(loaded)
    if batch is not None:
        return sum(batch_bytes(batch, config, footprint)) - sum(batch_bytes(batch, config))
    alone = sequences.mergeable_solo(loaded)
    if alone is None:
        return sum(generator_bytes(loaded, [footprint], 1, batched=True))
    step = config.prefill_step_size
    both = generator_bytes(loaded, [alone.footprint(step), footprint], 1, batched=True)
    return sum(both) - sum(batch_bytes(alone.batch, config))
