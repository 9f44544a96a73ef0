"""The running sequences and the generators they run on: continuous batching.

Each resident model with work has one mlx-lm ``BatchGenerator``; concurrent sequences of
that model decode together in one forward pass, new ones join between steps (their
prompts prefilled in chunks of ``prefill_step_size``, so a long prompt never freezes the
others' decoding), finished or cancelled ones leave. A sequence with nothing else of its
model running or waiting runs alone on a ``SoloGenerator`` (daemon/solo.py), without the
batching overhead; once others of its model come, it moves into their batch
(``merge_solo``), so that a round runs one forward pass per model, as mlx-lm's own
``BatchGenerator`` does. Models with work take turns, one step each per round, so none starves:
``Sequences.step_all`` is the one place a round steps the generators.

``Sequences`` owns the generators (``batches``) and the running sequences (``active``):
it starts what admission (daemon/admission.py) lets in, takes out and puts back what it
pauses, steps them (each new token made a chunk or an ending by daemon/stepping.py), and
ends them (daemon/endings.py). Others only read ``active``, ``batches`` and the counters.

Threading: worker thread only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import structlog
from mlx_lm.generate import BatchGenerator

from mlxd.protocol import CacheUse, Error, Generate, TokenLogprob, errors

from .cache import Lookup, PromptCache, cache_bytes
from .channels import Split
from .config import Config
from .endings import done, return_state, warm_refused
from .faults import Faults
from .kv_quant import dequantize, is_quantized, model_kv_bits
from .logprobs import of_round
from .memory import MemoryBudget
from .models import LoadedModel, ModelRegistry
from .outbox import Event
from .pausing import Held, can_pause, put_back, take_out
from .profiling import PROFILE
from .running import Batch, Sequence, forward_passes
from .sampling import StopMatcher
from .solo import SoloGenerator
from .stepping import Ending, advance, last_chunk
from .tools import reader_for

if TYPE_CHECKING:
    from .admission import Waiting

# One logger for all the worker thread does.
log = structlog.get_logger("mlxd.worker")


class Sequences:
    """The running sequences (``active``, by sink) and their models' generators."""

    def __init__(
        self,
        config: Config,
        cache: PromptCache,
        budget: MemoryBudget,
        models: ModelRegistry,
        faults: Faults,
    ) -> None:
        self.config = config
        """Replaced by the worker on a reload, between rounds."""
        self._cache = cache
        self._budget = budget
        self._models = models
        self._faults = faults
        self.active: dict[Any, Sequence] = {}  # by sink
        # By (model name, solo?), in turn order: each model has at most one BatchGenerator
        # and one SoloGenerator running at a time.
        self.batches: dict[tuple[str, bool], Batch] = {}
        self.tokens_generated = 0
        self.decode_steps = 0
        self.prompt_tokens_processed = 0
        self.tokens_drafted = 0
        self.tokens_accepted = 0
        self.changes = 0
        """Counts what changes the memory charged: sequences starting, ending, pausing,
        resuming, or prefilled (their first token)."""

    # ------------------------------------------------------------------ what runs, in bytes

    def running(self, loaded: LoadedModel) -> int:
        return sum(len(b.sequences) for (name, _), b in self.batches.items() if name == loaded.name)

    def joinable(self, loaded: LoadedModel) -> Batch | None:
        """The batch a new sequence of ``loaded`` would join: its model's, while it runs
        sequences of this load of the model."""
        batch = self.batches.get((loaded.name, False))
        if batch is None or not batch.sequences or batch.model is not loaded:
            return None
        return batch

    def mergeable_solo(self, loaded: LoadedModel) -> Sequence | None:
        """``loaded``'s sequence running alone, if it can move into a batch token-exact: it
        has had its first step (a sampled token to go on from) and its caches trim."""
        batch = self.batches.get((loaded.name, True))
        if batch is None or batch.model is not loaded:
            return None
        seq = next(iter(batch.sequences.values()), None)
        if seq is None or seq.first_token_at is None or seq.origin is None or seq.warm:
            return None
        if is_quantized(batch.generator.state):
            return None  # quantized KV runs alone (daemon/kv_quant.py): it stays there
        return seq if can_pause(loaded) else None

    # ------------------------------------------------------------------ joining, leaving

    def _batch_for(self, loaded: LoadedModel, solo: bool, events: list[Event]) -> Batch:
        """Where a new sequence of ``loaded`` runs: alone on ``generate_step`` when the model
        has nothing else running (``solo``: no batching overhead), else in the model's
        batch, which the model's sequence running alone (if any) then joins too."""
        if solo:
            eos = frozenset(loaded.tokenizer.eos_token_ids)
            opts = self.config.options(loaded.name)
            step = self.config.prefill_step_size
            bits = model_kv_bits(loaded, opts.kv_bits, opts.kv_group_size)
            single = SoloGenerator(loaded.model, eos, step, bits, opts.kv_group_size)
            batch = Batch(loaded, single, solo=True)
            self.batches[loaded.name, True] = batch
            return batch
        if (alone := self.mergeable_solo(loaded)) is not None:
            self.merge_solo(alone, events)
        batch = self.batches.get((loaded.name, False))
        if batch is not None and not batch.sequences and batch.config is not self.config:
            batch.generator.close()  # built before a reload: take the new sizes
            batch = None
        if batch is None or batch.model is not loaded:
            config = self.config
            generator = BatchGenerator(
                loaded.model,
                stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
                completion_batch_size=config.max_batch_size,
                prefill_batch_size=min(config.prefill_batch_size, config.max_batch_size),
                prefill_step_size=config.prefill_step_size,
            )
            batch = self.batches[loaded.name, False] = Batch(loaded, generator, config=config)
        return batch

    def _lookup(self, req: Generate, loaded: LoadedModel, tokens: list[int]) -> Lookup:
        if not req.cache or self._cache.max_bytes <= 0:
            return Lookup(None, 0, "bypass")
        return self._cache.fetch(loaded.name, tokens)

    def begin(self, waiting: Waiting, solo: bool, events: list[Event]) -> None:
        """Start ``waiting`` from the best state the prompt cache has for its prompt, on a
        new ``SoloGenerator`` if ``solo``, else in its model's batch."""
        req, loaded, tokens = waiting.request, waiting.model, waiting.prompt
        sink, received_at = waiting.sink, waiting.received_at
        sampler, processors = waiting.sampler, waiting.processors
        # The batch first: a solo sequence merging into it leaves its state open to forks
        # (``merge_solo``) before this prompt looks for one.
        batch = self._batch_for(loaded, solo, events)
        lookup = self._lookup(req, loaded, tokens)
        if not batch.solo and is_quantized(lookup.state):
            dequantize(lookup.state)  # a batch cannot run a quantized cache entry
        spec = waiting.speculation
        if batch.solo and isinstance(batch.generator, SoloGenerator):
            batch.generator.speculation = spec
        # No decoding past the model's context: what the footprint's span was charged for.
        max_tokens = waiting.footprint.span - len(tokens)
        (uid,) = batch.generator.insert(
            [tokens[lookup.reused :]],
            max_tokens=[max_tokens],
            caches=[lookup.state],
            # The cached part of the prompt: context for the penalties, and the start of
            # the token list the generator returns with the final state (the cache key).
            all_tokens=[tokens[: lookup.reused]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        loaded.active += 1
        use = CacheUse(kind=lookup.kind, miss_reason=lookup.miss_reason)  # type: ignore[arg-type]
        # A state others may fork the prompt's prefix from while this sequence runs: a
        # solo sequence's live state (it only grows past the prompt), or the state a
        # batch started from (merged into the batch's own arrays, never written to).
        source = batch.generator.state if isinstance(batch.generator, SoloGenerator) else None
        source = source or lookup.state
        lease = None
        if source is not None and use.kind != "bypass":
            lease = self._cache.lease(loaded.name, tokens, source)
        seq = Sequence(
            request=req,
            sink=sink,
            model=loaded,
            batch=batch,
            uid=uid,
            prompt=tokens,
            cache_use=use,
            cached_tokens=lookup.reused,
            lease=lease,
            stop=StopMatcher(req.stop),
            received_at=received_at,
            started_at=time.perf_counter(),
            span=waiting.footprint.span,
            max_tokens=max_tokens,
            # A solo sequence grows the state it took in place: its KV charge covers it.
            held=0 if batch.solo or lookup.state is None else cache_bytes(lookup.state),
            warm=waiting.warm,
            split=Split(loaded.tokenizer, tokens, reader_for(req, loaded.tokenizer)),
            speculation=spec,
            eos=frozenset(loaded.tokenizer.eos_token_ids),
            origin=waiting,
        )
        batch.sequences[uid] = seq
        self.active[sink] = seq
        self.changes += 1

    def pause(self, seq: Sequence, sampler: Any) -> Held | None:
        """Take ``seq`` out of its batch with what it needs to go on (daemon/pausing.py);
        None if it had nothing to keep. Either way it no longer runs; its model stays
        reserved (``active``)."""
        held = take_out(seq.batch.generator, seq.uid, sampler)
        self.changes += 1
        self.active.pop(seq.sink, None)
        seq.batch.sequences.pop(seq.uid, None)
        if seq.batch.solo:
            self.batches.pop((seq.model.name, True), None)  # remove() closed it
        if seq.lease is not None:
            self._cache.release(seq.lease)  # a solo state others forked from: no longer live
            seq.lease = None
        return held

    def resume(
        self,
        seq: Sequence,
        held: Held,
        sampler: Any,
        processors: Any,
        solo: bool,
        events: list[Event],
    ) -> None:
        """Put a paused sequence back into a batch: it goes on where it was."""
        batch = self._batch_for(seq.model, solo, events)
        if not batch.solo and is_quantized(held.state):
            dequantize(held.state)
        remaining = seq.max_tokens - seq.completion_tokens  # capped at the context
        if isinstance(batch.generator, SoloGenerator):  # alone again: it speculates again
            batch.generator.speculation = seq.speculation
        uid = put_back(batch.generator, held, remaining, sampler, processors)
        seq.model.active += 1
        seq.batch, seq.uid = batch, uid
        batch.sequences[uid] = seq
        self.active[seq.sink] = seq
        self.changes += 1

    def merge_solo(self, seq: Sequence, events: list[Event]) -> None:
        """Move ``seq`` from its ``SoloGenerator`` into its model's batch, as others of its
        model join: a round then runs one forward pass for all of them, not one for it and
        one for the batch (which at a few sequences costs nearly twice the time, the pass's
        fixed cost dominating). It leaves and comes back as a paused sequence does
        (daemon/pausing.py): its last token is fed again, the same tokens follow."""
        assert seq.origin is not None
        waiting = seq.origin
        forked_from = seq.lease is not None
        held = self.pause(seq, waiting.sampler)
        seq.model.active -= 1  # it left its generator; resume counts it again
        if held is None:
            message = "the sequence's state could not be moved into the model's batch"
            events.append(
                (seq.sink, Error(id=seq.request.id, code=errors.INTERNAL_ERROR, message=message))
            )
            return
        self.resume(seq, held, waiting.sampler, waiting.processors, False, events)
        if forked_from:
            # Its prompt's state may have come out of the cache whole (taken, not forked),
            # the others of its model forking theirs from it: the moved state (merged into
            # the batch's arrays, never written to) stays open to them.
            seq.lease = self._cache.lease(seq.model.name, seq.prompt, held.state)

    # ------------------------------------------------------------------ a round

    def step_all(self) -> list[Event]:
        """One step of every model's batch: the models with work take turns. Returns the
        round's chunks and ends."""
        events: list[Event] = []
        for batch in [b for b in self.batches.values() if b.sequences]:
            try:
                if self._faults and self._faults.hit(f"step_error:{batch.model.name}"):
                    raise RuntimeError("injected step error (MLXD_FAULTS)")
                began = time.perf_counter()
                _, responses = batch.generator.next()
                # Copy the states of the sequences that ended out now, while the batch's old
                # arrays are still there anyway: left lazy, they would keep those arrays alive
                # beside the filtered batch's new ones (a whole second copy of the batch).
                ended = [r.prompt_cache for r in responses if r.finish_reason and r.prompt_cache]
                mx.eval([c.state for state in ended for c in state])
                logprobs = of_round(batch.sequences, responses)
                if PROFILE is not None:
                    spent = time.perf_counter() - began
                    PROFILE.stepped(forward_passes(batch), spent, len(responses))
            except Exception as exc:
                # The batch's state can no longer be trusted: fail its sequences, start over.
                log.exception("batch_failed", model=batch.model.name)
                for seq in list(batch.sequences.values()):
                    self._drop(seq, None)
                    error = Error(id=seq.request.id, code=errors.INTERNAL_ERROR, message=repr(exc))
                    events.append((seq.sink, error))
                self.batches.pop((batch.model.name, batch.solo), None)
                batch.generator.close()
                continue
            if responses:
                self.decode_steps += 1
            for response in responses:
                seq = batch.sequences.get(response.uid)
                if seq is not None:
                    self._step(seq, response, events, logprobs.get(response.uid))
        return events

    def _step(
        self, seq: Sequence, response: Any, events: list[Event], logprob: TokenLogprob | None
    ) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.changes += 1
            self.prompt_tokens_processed += len(seq.prompt) - seq.cached_tokens
        if response.finish_reason is not None:
            final = (response.prompt_cache, response.all_tokens)
        else:
            final = None
        counted = seq.completion_tokens
        step = advance(seq, response.token, logprob)
        self.tokens_generated += seq.completion_tokens - counted  # not an end-of-sequence token
        if isinstance(step, Ending):
            self._finish(seq, step, events, final)
        elif step is not None:
            events.append((seq.sink, step))

    # ------------------------------------------------------------------ ends

    def _finish(
        self,
        seq: Sequence,
        ending: Ending,
        events: list[Event],
        final: tuple[list[Any], list[int]] | None = None,
    ) -> None:
        """End ``seq``: its last chunk, then ``done``. ``final`` is the (state, tokens) the
        generator returned if it ended the sequence itself; else the state is taken out."""
        reason, chunk = last_chunk(seq, ending)
        if chunk is not None:
            events.append((seq.sink, chunk))
        if seq.speculation is not None:
            self.tokens_drafted += seq.speculation.drafted
            self.tokens_accepted += seq.speculation.accepted
        if final is None:
            removed = seq.batch.generator.remove([seq.uid], return_prompt_caches=True)
            final = removed.get(seq.uid)
        cached = self._drop(seq, final, finished=reason != "cancelled")
        if seq.warm is not None and reason != "cancelled" and not cached:
            events.append((seq.sink, warm_refused(seq, final)))
            return
        events.append((seq.sink, done(seq, reason)))

    def _drop(
        self,
        seq: Sequence,
        final: tuple[list[Any], list[int]] | None,
        finished: bool = False,
    ) -> bool:
        """Forget ``seq``; ``final`` (its KV state and every token it holds) goes back to the
        prompt cache (daemon/endings.py). Returns whether it did."""
        self.active.pop(seq.sink, None)
        self.changes += 1
        seq.batch.sequences.pop(seq.uid, None)
        if seq.batch.solo:
            self.batches.pop((seq.model.name, True), None)
        seq.model.active -= 1
        seq.model.touch(None)
        if seq.lease is not None:
            self._cache.release(seq.lease)
        step = self.config.prefill_step_size
        return return_state(seq, final, finished, self._cache, self._budget, self._models, step)

    def cancel(self, sink: Any, events: list[Event]) -> None:
        """End ``sink``'s running sequence, if any, with ``done`` (``cancelled``)."""
        seq = self.active.get(sink)
        if seq is not None:
            self._finish(seq, Ending("cancelled"), events)

    def cancel_model(self, name: str, events: list[Event]) -> None:
        """End model ``name``'s running sequences with ``done`` (``cancelled``)."""
        for seq in [s for s in self.active.values() if s.model.name == name]:
            self._finish(seq, Ending("cancelled"), events)

    def end_all(self, code: str, message: str, events: list[Event]) -> None:
        """End every running sequence with an ``error`` (its state still cached)."""
        for seq in list(self.active.values()):
            removed = seq.batch.generator.remove([seq.uid], return_prompt_caches=True)
            self._drop(seq, removed.get(seq.uid))
            events.append((seq.sink, Error(id=seq.request.id, code=code, message=message)))

    def close_model(self, name: str) -> None:
        """Close model ``name``'s generators (it was unloaded)."""
        for solo in (False, True):
            batch = self.batches.pop((name, solo), None)
            if batch is not None:
                batch.generator.close()
