"""Rendering a request's prompt as tokens: which of ``prompt``, ``messages`` or ``tokens``
it gives, the chat template, fill-in-the-middle framing for a ``suffix``, the BOS rule, and
the limits a prompt must keep to (``max_prompt_tokens``, the model's context); and the
tokens a chat's next turn will start with (its next-turn key, see daemon/endings.py).

A prompt too big for the limits by its size alone is refused before anything tokenizes
it (``refuse_oversized``, on the bound daemon/prompts.py computes); intake
(daemon/intake.py) tokenizes a small one at once on the worker and hands a big one to the
tokenizer thread, which calls ``prompt_tokens`` there.

Threading: ``prompt_tokens`` runs on the worker or the tokenizer thread: HF tokenizer
work only, never MLX. ``refuse_oversized``, ``fim_mode`` and ``next_turn_tokens`` run on
the worker thread. A HF fast tokenizer may be used by two threads at once as long as
neither changes its truncation or padding, which mlxd never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlxd.protocol import ChatMessage, Generate, ToolCall, errors

from .models import LoadedModel, ModelError, RequestError
from .prompts import least_tokens
from .reasoning import template_switches
from .sampling import InvalidField
from .tools import template_messages, template_tools, tool_dicts

# Fill-in-the-middle token names, each in prefix-suffix-middle (PSM) order: Qwen2.5-Coder
# and the demo models; StarCoder; DeepSeek-Coder (its "hole" marks the suffix's place).
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),
)


def fim_ids(tokenizer: Any) -> tuple[int, int, int] | None:
    """The ids of the model's FIM tokens, or None when its vocabulary has none."""
    for names in FIM_TOKENS:
        ids = tokenizer.convert_tokens_to_ids(list(names))
        # An unknown name maps to None or to the unk token, which converts back to another name.
        if all(isinstance(i, int) for i in ids) and tokenizer.convert_ids_to_tokens(ids) == list(
            names
        ):
            return ids[0], ids[1], ids[2]
    return None


def fim_prompt(tokenizer: Any, fim: tuple[int, int, int], prefix: str, suffix: str) -> list[int]:
    """``[BOS] <prefix-token> prefix <suffix-token> suffix <middle-token>``: BOS only if the
    tokenizer adds one to plain prompts; each text part encoded without special tokens."""
    specials = tokenizer.encode("", add_special_tokens=True)
    bos = tokenizer.bos_token_id
    lead = specials[:1] if specials and bos is not None and specials[0] == bos else []
    pre, suf, mid = fim
    return [
        *lead,
        pre,
        *tokenizer.encode(prefix, add_special_tokens=False),
        suf,
        *tokenizer.encode(suffix, add_special_tokens=False),
        mid,
    ]


def fim_mode(req: Generate, loaded: LoadedModel) -> str | None:
    """What ``done.fim`` says of a request: None without a suffix."""
    if req.suffix is None:
        return None
    return "tokens" if fim_ids(loaded.tokenizer) is not None else "prefix_only"


def prompt_tokens(
    req: Generate, loaded: LoadedModel, max_prompt_tokens: int | None, warm: bool = False
) -> list[int]:
    """``req``'s prompt as ``loaded``'s tokens; raises what refuses it (an invalid field,
    ``prompt_too_long``). ``warm``: a warm-up's conversation, rendered as a prefix."""
    tokenizer = loaded.tokenizer
    given = [x is not None for x in (req.prompt, req.messages, req.tokens)]
    if sum(given) != 1:
        raise InvalidField("$.prompt", "give exactly one of prompt, messages or tokens")
    if req.suffix is not None and req.prompt is None:
        raise InvalidField("$.suffix", "suffix goes with prompt (the text before the cursor)")
    if not warm and req.messages is None:
        template_switches(req, tokenizer, loaded.name)  # refuses think without messages
    tools = template_tools(req, tokenizer, loaded.name)  # and tools without them
    if req.tokens is not None:
        bad = [t for t in req.tokens if t >= loaded.vocab_size]
        if bad:
            raise InvalidField("$.tokens", f"token id {bad[0]} is outside the vocabulary")
        tokens = list(req.tokens)
    elif req.messages is not None:
        if not tokenizer.chat_template:
            raise InvalidField("$.messages", f"model {loaded.name!r} has no chat template")
        messages = template_messages(req.messages)
        switches = template_switches(req, tokenizer, loaded.name) if not warm else {}
        if tools is not None:  # a warm-up's too: the tools are most of a prompt's prefix
            switches["tools"] = tools
        try:
            # A warmed conversation is a prefix of later turns: no generation prompt.
            tokens = list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=not warm, **switches)
            )
        except Exception as exc:  # a template may refuse roles or orders (raise_exception)
            raise InvalidField("$.messages", f"the chat template refused them: {exc}") from exc
    elif req.suffix is not None and (fim := fim_ids(tokenizer)) is not None:
        tokens = fim_prompt(tokenizer, fim, req.prompt or "", req.suffix)
    else:
        # Without FIM tokens a suffix is dropped: the prefix alone (done.fim says so).
        prompt = req.prompt or ""
        # As mlx-lm's stream_generate does: add BOS unless the text already starts with it.
        bos = tokenizer.bos_token
        tokens = tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
    if not tokens:
        raise InvalidField("$.prompt", "the prompt is empty")
    cap = max_prompt_tokens
    if cap is not None and len(tokens) > cap:
        raise RequestError(
            errors.PROMPT_TOO_LONG,
            f"the prompt has {len(tokens)} tokens; this daemon takes at most {cap}",
        )
    limit = loaded.context_length
    if limit is not None and len(tokens) >= limit:
        raise ModelError(
            errors.PROMPT_TOO_LONG,
            f"the prompt has {len(tokens)} tokens; model {loaded.name!r} takes fewer than {limit}",
        )
    return tokens


def refuse_oversized(req: Generate, loaded: LoadedModel, max_prompt_tokens: int | None) -> None:
    """Refuse a prompt that its size alone puts over the limits, without tokenizing it."""
    least = least_tokens(req, loaded.max_token_bytes)
    cap, context = max_prompt_tokens, loaded.context_length
    if cap is not None and least > cap:
        raise RequestError(
            errors.PROMPT_TOO_LONG,
            f"the prompt has at least {least} tokens; this daemon takes at most {cap}",
        )
    if context is not None and least >= context:
        raise RequestError(
            errors.PROMPT_TOO_LONG,
            f"the prompt has at least {least} tokens; "
            f"model {loaded.name!r} takes fewer than {context}",
        )


def next_turn_tokens(
    req: Generate, reply: str, calls: Sequence[ToolCall], tokenizer: Any
) -> list[int] | None:
    """The tokens a chat's next turn starts with: ``req``'s history plus ``reply`` and the
    ``calls`` it made, rendered by the template with the same tools; None if the template
    refuses them."""
    assert req.messages is not None
    reply_turn = ChatMessage(role="assistant", content=reply)
    history = template_messages([*req.messages, reply_turn], calls)
    tools = {"tools": tool_dicts(req.tools)} if req.tools else {}
    try:
        return list(tokenizer.apply_chat_template(history, add_generation_prompt=False, **tools))
    except Exception:  # a template may refuse; the generated tokens still make a key
        return None
