"""The Backend protocol: everything the pipeline asks of a model, in numpy and plain Python.

torch and mlx tensors never cross this boundary; each backend converts at its edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import numpy as np

from pertoken.errors import PertokenError
from pertoken.rows import check_steer_row

Positions = Literal["all", "prompt", "response"]
POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class SteerTerm:
    row: int  # row L: added to the output of block L-1
    vector: np.ndarray  # [hidden] float32
    coef: float


@dataclass
class Steer:
    """Add `coef * vector` at one or more rows.

    positions: `all` every position; `prompt` the prompt's tokens (prefill only);
    `response` every position whose output predicts an answer token, i.e. the last prompt
    token and every generated token (as the upstream persona-vector steerer does).
    """

    terms: list[SteerTerm]
    positions: Positions = "all"

    @classmethod
    def single(cls, row: int, vector, coef: float, positions: Positions = "all") -> Steer:
        return cls([SteerTerm(row, np.asarray(vector, dtype=np.float32), float(coef))], positions)

    def by_row(self) -> dict[int, np.ndarray]:
        """Sum of coef * vector per row, each [hidden] float32."""
        out: dict[int, np.ndarray] = {}
        for t in self.terms:
            add = np.asarray(t.vector, dtype=np.float32) * np.float32(t.coef)
            out[t.row] = out[t.row] + add if t.row in out else add
        return out

    def validate(self, n_layers: int, hidden_size: int) -> None:
        if self.positions not in POSITIONS:
            raise PertokenError(f"positions must be one of {POSITIONS}, not {self.positions!r}")
        for t in self.terms:
            check_steer_row(t.row, n_layers)
            if np.shape(t.vector) != (hidden_size,):
                raise PertokenError(
                    f"steering vector has shape {tuple(np.shape(t.vector))} but this model's "
                    f"hidden size is {hidden_size}: use a vector extracted from the same model"
                )


# One Steer for every prompt, or a list with one Steer (or None: unsteered) per prompt.
RowSteers = Steer | list[Steer | None] | None


def steer_rows(steer: RowSteers, n: int, n_layers: int, hidden_size: int) -> list[Steer | None]:
    """Validated per-prompt steering: `steer` repeated for each of n prompts, or its own list."""
    plans = list(steer) if isinstance(steer, (list, tuple)) else [steer] * n
    if len(plans) != n:
        raise PertokenError(
            f"got {len(plans)} steering plans for {n} prompts: give one Steer (or None) per prompt"
        )
    for plan in plans:
        if plan is not None:
            plan.validate(n_layers, hidden_size)
    return plans


def steer_mask(prompt_len: int, total_len: int, positions: Positions) -> np.ndarray:
    """[total_len] bool: which positions of one unpadded sequence a Steer acts on."""
    idx = np.arange(total_len)
    if positions == "all":
        return np.ones(total_len, dtype=bool)
    if positions == "prompt":
        return idx < prompt_len
    return idx >= prompt_len - 1


class Summaries(NamedTuple):
    """Per-sample means of the residual stream, each [N, n_layers + 1, hidden] float32."""

    prompt_avg: np.ndarray
    prompt_last: np.ndarray
    response_avg: np.ndarray


@dataclass
class TokenTrace:
    """One generated answer with the hidden state of each answer token at chosen rows."""

    prompt: str
    text: str  # the answer, decoded
    tokens: list[str]  # text piece of each answer token
    token_ids: list[int]
    rows: list[int]
    hidden: np.ndarray  # [T, len(rows), hidden] float32
    meta: dict = field(default_factory=dict)


# Called once per answer token while generating: (token index, text piece, [len(rows), hidden]).
TokenCallback = Callable[[int, str, np.ndarray], None]


@dataclass
class TokenStep:
    """One answer token of one prompt, reported while batched generation runs."""

    prompt: int  # index into the prompts given to `generate`
    index: int  # the token's place in its answer, from 0
    token_id: int
    hidden: np.ndarray | None = None  # [len(rows), hidden] float32 at the token's own position
    logprob: float | None = None  # log p(token) under the model's own (unscaled) distribution
    top: list[tuple[int, float]] | None = None  # the most likely (token id, logprob), best first


# Returning False ends that prompt's answer after this token (a client went away, say).
StepCallback = Callable[[TokenStep], bool | None]


@dataclass
class Streaming:
    """What `generate` reports for every answer token while it decodes.

    rows: capture each token's hidden state at these rows (its own position, as `trace` does);
    logprobs: None for none, 0 for the chosen token's, k for the chosen token's and the top k;
    on_flush: called once after each decode step's reports (to hand them on together).
    """

    on_step: StepCallback
    rows: list[int] = field(default_factory=list)
    logprobs: int | None = None
    on_flush: Callable[[], None] | None = None


class Backend(Protocol):
    name: str  # "torch" or "mlx"
    model_id: str
    n_layers: int
    hidden_size: int
    dtype: str  # "float32", "bfloat16", ...
    device: str  # "cuda", "cpu", "mps", "gpu"
    context_length: int | None  # positions the model was trained for, when its config says

    @classmethod
    def load(cls, model: str, *, dtype: str | None = None, device: str | None = None) -> Backend:
        """Load a Hugging Face hub id or a local folder."""
        ...

    def chat_prompt(self, system: str | None, user: str) -> str:
        """The chat-templated prompt with the generation prompt added."""
        ...

    def chat_messages(self, messages: list[dict]) -> str:
        """A whole chat ({"role", "content"} dicts) templated, with the generation prompt."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without adding special tokens."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 1000,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        steer: RowSteers = None,
        batch_size: int | None = None,
        stream: Streaming | None = None,
    ) -> list[str]:
        """Answers to chat-templated prompts (temperature 0 is greedy).

        steer: one Steer for every prompt, or a list with one Steer or None per prompt (each
        row of a batch carries its own terms and positions); stream: per-token reports."""
        ...

    def summaries(
        self, prompts: list[str], answers: list[str], *, batch_size: int = 8
    ) -> Summaries: ...

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
    ) -> TokenTrace: ...

    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text (no special tokens added).

        prompt_len (tokens) tells `prompt`/`response` steering where the answer starts;
        default: the whole text is prompt."""
        ...

    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the token after each prompt."""
        ...
