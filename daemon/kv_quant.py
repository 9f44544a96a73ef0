"""Quantized KV: converting states between mlx-lm's ``KVCache`` and ``QuantizedKVCache``,
and what a quantized state costs in bytes.

Two uses (see docs/ARCHITECTURE.md, "Quantized KV"):

- a model configured with ``kv_bits`` (``[model_options.NAME]``) runs a sequence that is
  alone on its model quantized from its first token, exactly as mlx-lm's ``generate_step``
  with ``kv_bits``, ``kv_group_size`` and ``quantized_kv_start=0`` (daemon/solo.py);
- with ``cache.kv_bits`` set, the prompt cache stores its entries quantized
  (``quantize``: mlx-lm's own ``KVCache.to_quantized``, layer by layer), so the same bytes
  hold several times more of them. A sequence that takes such an entry continues it
  quantized when it runs alone (generate_step with the entry's bits and group size), and
  dequantized (``dequantize``) when it joins a batch: mlx-lm's ``BatchGenerator`` has no
  quantized cache.

Every conversion here works one layer at a time and evaluates it before the next, so the
peak is one layer's two forms, never the whole state's (issue 18: a full second copy of a
state is what pushed servers past their memory).

Threading: worker thread only (it calls MLX).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import mlx.core as mx
import structlog
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

log = structlog.get_logger("mlxd.worker")

BITS = (2, 3, 4, 5, 6, 8)
"""What ``mx.quantize`` takes."""
GROUP_SIZES = (32, 64, 128)


def is_quantized(state: list[Any] | None) -> bool:
    return bool(state) and any(type(c) is QuantizedKVCache for c in state)  # type: ignore[union-attr]


def bits_of(state: list[Any]) -> tuple[int, int] | None:
    """(bits, group size) of the first quantized layer of ``state``; None if none is."""
    for c in state:
        if type(c) is QuantizedKVCache:
            return int(c.bits), int(c.group_size)
    return None


def can_quantize(state: list[Any], group_size: int) -> bool:
    """Whether every plain layer's head dimension splits into ``group_size`` groups
    (``mx.quantize``'s condition); layers of other types are left as they are."""
    return all(
        c.keys.shape[-1] % group_size == 0 and c.values.shape[-1] % group_size == 0
        for c in state
        if type(c) is KVCache and c.keys is not None
    )


def quantize(state: list[Any], bits: int, group_size: int) -> bool:
    """Replace ``state``'s plain ``KVCache`` layers, in place, by mlx-lm's
    ``to_quantized(group_size, bits)`` of them; returns whether any was. A state whose head
    dimension ``group_size`` does not divide is left plain."""
    if not can_quantize(state, group_size):
        return False
    changed = False
    for i, c in enumerate(state):
        if type(c) is not KVCache or c.keys is None:
            continue
        q = c.to_quantized(group_size=group_size, bits=bits)
        compact(q)
        mx.eval(q.keys, q.values)
        state[i] = q  # the plain arrays go with the last reference to ``c``
        changed = True
    return changed


def dequantize(state: list[Any]) -> None:
    """Replace ``state``'s ``QuantizedKVCache`` layers, in place, by plain ``KVCache`` ones
    holding ``mx.dequantize`` of their tokens (for a batch, which cannot run them)."""
    for i, c in enumerate(state):
        if type(c) is not QuantizedKVCache:
            continue
        plain = KVCache()
        if c.keys is not None and c.offset > 0:
            keys, values = (
                _dequantize(x, c.offset, c.group_size, c.bits) for x in (c.keys, c.values)
            )
            plain.keys, plain.values, plain.offset = keys, values, c.offset
            mx.eval(plain.keys, plain.values)
        state[i] = plain


def _dequantize(parts: tuple[mx.array, ...], n: int, group_size: int, bits: int) -> mx.array:
    w, scales, biases = (a[..., :n, :] for a in parts)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def fork_layer(layer: QuantizedKVCache, length: int) -> QuantizedKVCache:
    """The first ``length`` tokens of a quantized layer as slices of its arrays (views,
    copied by MLX before either side writes: see ``cache.fork``)."""
    f = QuantizedKVCache(group_size=layer.group_size, bits=layer.bits)
    if layer.keys is not None:
        f.keys = tuple(a[..., :length, :] for a in layer.keys)
        f.values = tuple(a[..., :length, :] for a in layer.values)
        f.offset = length
    return f


def compact(layer: QuantizedKVCache) -> None:
    """Cut a quantized layer's arrays to its tokens, each owning its buffer: mlx-lm grows
    them 256 tokens at a time, and a stored entry must not be billed for (or keep) slack."""
    if layer.keys is None:
        return
    n = layer.offset
    layer.keys = tuple(mx.contiguous(a[..., :n, :]) for a in layer.keys)
    layer.values = tuple(mx.contiguous(a[..., :n, :]) for a in layer.values)


def bytes_per_element(bits: int, group_size: int, itemsize: int) -> float:
    """Bytes one KV element costs quantized: its packed bits, and a scale and a bias (in
    the model's dtype) shared by each ``group_size`` of them."""
    return bits / 8 + 2 * itemsize / group_size


def quantized_share(bits: int, group_size: int, itemsize: int) -> float:
    """A quantized state's size over the plain one's (0.28 at 4 bits, 64 a group, fp16)."""
    return bytes_per_element(bits, group_size, itemsize) / itemsize


_PER_TOKEN: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], int | None]] = (
    weakref.WeakKeyDictionary()
)


def quantized_bytes_per_token(loaded: Any, bits: int, group_size: int) -> int | None:
    """What one token of ``loaded``'s KV costs quantized, measured as
    ``weights.kv_bytes_per_token`` measures the plain cost: a one-token forward pass, its
    cache quantized. None where the model's head dimension cannot be quantized in groups
    of ``group_size`` (its ``kv_bits`` is then not used: logged once)."""
    known = _PER_TOKEN.setdefault(loaded, {})
    if (bits, group_size) not in known:
        cache = make_prompt_cache(loaded.model)
        loaded.model(mx.array([[0]]), cache=cache)
        if not quantize(cache, bits, group_size):
            log.warning("kv_bits_unusable", model=loaded.name, kv_group_size=group_size)
            known[bits, group_size] = None
        else:
            arrays = [a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
            known[bits, group_size] = sum(
                math.ceil(a.nbytes / a.shape[2]) for a in arrays if a.ndim == 4 and a.shape[2]
            )
    return known[bits, group_size]


def model_kv_bits(loaded: Any, kv_bits: int | None, group_size: int) -> int | None:
    """The ``kv_bits`` a lone sequence of ``loaded`` runs with: the configured ones, if its
    head dimension can take them."""
    if kv_bits is None or quantized_bytes_per_token(loaded, kv_bits, group_size) is None:
        return None
    return kv_bits
