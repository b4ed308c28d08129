"""Generation written once for every backend: a call becomes one Entry per prompt, inserted
into the backend's slot loop (insert, step, busy), which every answer, stream, trace and server
request runs through.

A backend supplies only what touches its tensors: `_slots(batch, rows, length)`, the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from pertoken.backends.base import (
    AnswerCallback,
    Sampling,
    SlotSteers,
    Steer,
    Streaming,
    TokenCallback,
    TokenStep,
    TokenTrace,
    slot_uniforms,
    steer_slots,
)
from pertoken.backends.conditions import decide, decide_one, trace_meta
from pertoken.backends.plan import TokenPieces, encode_texts, token_pieces
from pertoken.backends.schedule import check_slots, prompt_seeds
from pertoken.errors import PertokenError
from pertoken.rows import check_capture_rows

SHORTHAND = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


@dataclass(eq=False)
class Entry:
    """One prompt in a slot loop, with everything its answer depends on.

    Entries compare by identity: two requests with equal fields are still two requests."""

    ids: list[int]
    sampling: Sampling  # resolved: `plain`, a float temperature
    max_new_tokens: int
    on_end: Callable[[Entry], None]  # called once, as the answer ends (or the entry is cancelled)
    plan: Steer | None = None
    uniforms: np.ndarray | None = None  # [max_new_tokens] float64 draws; None when greedy
    prompt: int = 0  # reported as TokenStep.prompt
    on_step: Callable[[TokenStep], bool | None] | None = None  # False ends the answer
    hidden: bool = False  # report the loop's captured rows with each token
    logprobs: int | None = None  # None, 0 (the chosen token's) or k (and the top k)
    key: Hashable = None  # entries with the same key (and waiting together) share a prefill
    answer: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread: the loop frees the slot at its next step
    prefilled: int = 0  # prompt tokens the prefill computed (fewer with a cached prefix)

    def __post_init__(self):
        if self.key is None:
            self.key = (tuple(self.ids), id(self.plan))

    def bias(self) -> dict[int, float]:
        return dict(self.sampling.logit_bias or {})


class Slots(Protocol):
    """A backend's slot loop: entries wait, are prefilled into free slots, decode together."""

    def insert(self, entry: Entry) -> None: ...

    def step(self) -> None:
        """Admit waiting entries into free slots, then advance every slot by one token."""
        ...

    @property
    def busy(self) -> bool: ...


class SlotBackend:
    """What every backend shares around its slot loop: encoding, the per-prompt plan, seeds,
    stop strings, streaming and traces. Subclasses set n_layers, hidden_size, generation_config
    and implement `_slots` and `_auto_batch`."""

    n_layers: int
    hidden_size: int
    dtype: str = "float32"  # the weights' dtype: a steering coefficient must fit it
    generation_config: dict = {}

    def _slots(self, batch: int, rows: list[int], length: int, on_flush=None, prefix=None) -> Slots:
        """The backend's slot loop; `prefix`: a PrefixCache its prefills read and fill."""
        raise NotImplementedError

    def _auto_batch(self, max_len: int) -> int:
        return 8

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 1000,
        sampling: Sampling | None = None,
        steer: SlotSteers = None,
        stream: Streaming | None = None,
        on_answer: AnswerCallback | None = None,
        batch_size: int | None = None,
        seeds: list[int] | None = None,
        **shorthand,
    ) -> list[str]:
        """Answers to chat-templated prompts, each decoded in one of `batch_size` slots that
        are refilled as answers end (default: what memory allows).

        sampling (or its fields as keywords: temperature, top_p, top_k, repetition_penalty,
        seed): how tokens are drawn; steer: one Steer for every prompt or one (or None) per
        prompt; stream: per-token reports (token, logprobs, hidden states at stream.rows),
        whose callback may end an answer; on_answer(i, text): each answer as it ends; seeds:
        one per prompt (default prompt_seeds(sampling.seed)), so each prompt's answer is its
        solo run's whatever shares the slots."""
        sampling = self._sampling(sampling, shorthand)
        seqs = encode_texts(self.encode, prompts)
        entries = self._entries(seqs, sampling, max_new_tokens, steer, seeds, stream)
        texts = [""] * len(seqs)

        def ended(e: Entry) -> None:
            texts[e.prompt] = cut_at_stop(self.decode(e.answer), sampling.stop)
            if on_answer is not None:
                on_answer(e.prompt, texts[e.prompt])

        for e in entries:
            e.on_end = ended
        rows = list(stream.rows) if stream is not None else []
        length = max(map(len, seqs)) + max_new_tokens + 1  # + 1: a captured last token
        slots = min(check_slots(batch_size or self._auto_batch(length)), len(seqs))
        loop = self._slots(slots, rows, length, stream.on_flush if stream else None)
        for e in _admission_order(entries):
            loop.insert(e)
        while loop.busy:
            loop.step()
        return texts

    def _sampling(self, sampling: Sampling | None, shorthand: dict) -> Sampling:
        unknown = sorted(set(shorthand) - set(SHORTHAND))
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        sampling = replace(sampling or Sampling(), **shorthand)
        return sampling.for_model(self.generation_config)

    def _entries(self, seqs, sampling, max_new_tokens, steer, seeds, stream) -> list[Entry]:
        """One Entry per prompt: its steering plan, its seed's draws, its stream."""
        plans = steer_slots(steer, len(seqs), self.n_layers, self.hidden_size, self.dtype)
        plans = decide(self, seqs, plans)  # `when` terms kept or dropped per prompt
        if stream is not None:
            check_capture_rows(stream.rows, self.n_layers)
        seeds = prompt_seeds(sampling.seed, len(seqs)) if seeds is None else list(seeds)
        if len(seeds) != len(seqs):
            raise PertokenError(f"{len(seeds)} seeds for {len(seqs)} prompts: give one per prompt")
        draws = None if sampling.greedy else slot_uniforms(seeds, max_new_tokens)
        on_step = _stop_strings(self.decode, sampling.stop, stream)
        return [
            Entry(
                ids=s, sampling=sampling, max_new_tokens=max_new_tokens, on_end=lambda e: None,
                plan=p, uniforms=None if draws is None else draws[i], prompt=i,
                on_step=on_step(i) if on_step else None, hidden=bool(stream and stream.rows),
                logprobs=stream.logprobs if stream is not None else None,
            )
            for i, (s, p) in enumerate(zip(seqs, plans, strict=True))
        ]  # fmt: skip

    # ------------------------------------------------------------------ traces
    def trace(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        rows: list[int],
        steer: Steer | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        on_token: TokenCallback | None = None,
    ) -> TokenTrace:
        """One answer with each answer token's hidden state at `rows` ([T, len(rows), hidden]),
        captured at the token's own position as it is generated."""
        rows = [int(r) for r in rows]
        if not rows:
            raise PertokenError("no layers to trace: give at least one layer")
        check_capture_rows(rows, self.n_layers)
        steer = decide_one(self, encode_texts(self.encode, [prompt])[0], steer)
        ids, states, pieces = [], [], TokenPieces(self.decode)

        def on_step(s: TokenStep) -> None:
            ids.append(s.token_id)
            states.append(s.hidden)
            if on_token is not None:
                on_token(s.index, pieces.add(s.token_id), s.hidden)

        self.generate(
            [prompt], max_new_tokens=max_new_tokens, sampling=Sampling(temperature),
            steer=[steer], seeds=[seed], stream=Streaming(on_step, rows=rows), batch_size=1,
        )  # fmt: skip
        hidden = np.stack(states) if states else np.zeros((0, len(rows), self.hidden_size))
        meta = {"backend": getattr(self, "name", ""), "model": getattr(self, "model_id", "")}
        meta |= trace_meta(steer)
        return TokenTrace(
            prompt, self.decode(ids), token_pieces(self.decode, ids), ids, rows,
            hidden.astype(np.float32), meta | {"temperature": temperature},
        )  # fmt: skip


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string in it (all of it when none occurs)."""
    at = [text.find(s) for s in stop if s and s in text]
    return text[: min(at)] if at else text


def _stop_strings(decode, stop: tuple[str, ...], stream: Streaming | None):
    """A factory of per-prompt step callbacks that pass each step to the stream and end the
    answer once its text holds a stop string; None when there is neither."""
    if not stop and stream is None:
        return None

    def for_prompt(i: int):
        pieces = TokenPieces(decode)

        def on_step(s: TokenStep) -> bool:
            go = stream.on_step(s) is not False if stream is not None else True
            if stop:
                pieces.add(s.token_id)
                go = go and cut_at_stop(pieces.given, stop) == pieces.given
            return go

        return on_step

    return for_prompt


def _admission_order(entries: list[Entry]) -> list[Entry]:
    """Shortest prompts first (a batch of admissions is padded little); the samples of one
    key stay together, in the order given."""
    first: dict[Hashable, int] = {}
    for i, e in enumerate(entries):
        first.setdefault(e.key, i)
    size = [len(entries[first[e.key]].ids) for e in entries]
    order = sorted(range(len(entries)), key=lambda i: (size[i], first[entries[i].key]))
    return [entries[i] for i in order]
