"""Per-model options: ``[model_options.NAME]`` tables in the configuration file.

One ``ModelOptions`` struct, one field per option, validated by msgspec as the rest of
the file is (a bad value names its key and line: daemon/settings.py). The options of a
model name apply to whatever that name loads (a ``models`` entry or a ``models_dir``
folder). They come from the file only: no ``MLXD_*`` variable or flag sets them.

Threading: immutable; read by every thread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

NUM_DRAFT_TOKENS = 4
"""Tokens speculative decoding proposes per forward pass, unless a model's options say:
past a few, a rejected run wastes the pass's work."""


class ModelOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kv_bits: Literal[2, 3, 4, 5, 6, 8] | None = None
    """Quantize the KV of the model's sequences to this many bits, from their first token:
    mlx-lm's ``generate_step(kv_bits=, kv_group_size=, quantized_kv_start=0)``. Applies to
    a sequence running alone on its model; sequences decoded together in a batch keep
    plain KV (mlx-lm's ``BatchGenerator`` has no quantized cache)."""
    kv_group_size: Literal[32, 64, 128] = 64
    """Elements sharing one scale and bias; must divide the model's head dimension."""
    draft: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """A model name (a ``models`` entry or a ``models_dir`` folder) whose weights propose
    tokens for this model's ``speculative: "draft"``: loaded with it (its weights and KV
    charged to it), with the same vocabulary."""
    speculative: Literal["off", "prompt_lookup", "draft"] | None = None
    """How a generate of this model speculates when it does not say (daemon/speculative.py);
    ``draft`` needs ``draft``."""
    num_draft_tokens: Annotated[int, msgspec.Meta(ge=1, le=16)] = NUM_DRAFT_TOKENS
    """Tokens proposed per forward pass, by either mode."""

    def __post_init__(self) -> None:
        if self.speculative == "draft" and self.draft is None:
            raise ValueError("speculative = 'draft' needs a draft model (draft = NAME)")


DEFAULT = ModelOptions()


def lines(options: dict[str, ModelOptions], sources: dict[str, str]) -> list[str]:
    """``mlxd config show``'s lines for the options set, each with its source."""
    import tomlkit

    out = []
    for name, opts in options.items():
        key = f"model_options.{tomlkit.key(name).as_string()}"
        for field, value in _set(opts).items():
            source = sources.get(f"model_options.{name}", "default")
            out.append(f"{key}.{field} = {tomlkit.item(value).as_string()}  # {source}")
    return out


def as_json(options: dict[str, ModelOptions], sources: dict[str, str]) -> dict[str, Any]:
    return {
        f"model_options.{name}.{field}": {
            "value": value,
            "source": sources.get(f"model_options.{name}", "default"),
        }
        for name, opts in options.items()
        for field, value in _set(opts).items()
    }


def changed(old: dict[str, ModelOptions], new: dict[str, ModelOptions]) -> list[str]:
    return [
        f"model_options.{name}"
        for name in sorted(set(old) | set(new))
        if old.get(name, DEFAULT) != new.get(name, DEFAULT)
    ]


def bad_entry(raw: dict[str, Any]) -> str | None:
    """The first name in a raw ``model_options`` table whose options do not validate (for
    the error message: msgspec names a table's entry ``[...]``)."""
    for name, value in raw.items():
        try:
            msgspec.convert(value, ModelOptions)
        except msgspec.ValidationError:
            return str(name)
    return None


def _set(opts: ModelOptions) -> dict[str, Any]:
    """The fields that differ from their defaults."""
    return {
        f: getattr(opts, f)
        for f in opts.__struct_fields__
        if getattr(opts, f) != getattr(DEFAULT, f)
    }
