"""The Backend protocol: everything the pipeline asks of a model, in numpy and plain Python.

torch and mlx tensors never cross this boundary; each backend converts at its edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np

from pertoken.backends.plan import steer_mask as steer_mask  # one rule for Steer.positions
from pertoken.backends.sampler import sampling_options
from pertoken.backends.steer import Condition as Condition
from pertoken.backends.steer import Positions as Positions
from pertoken.backends.steer import Steer as Steer
from pertoken.backends.steer import SteerTerm as SteerTerm
from pertoken.errors import PertokenError
from pertoken.names import POSITIONS as POSITIONS
from pertoken.rows import check_capture_rows


def slot_uniforms(seeds: list[int], n_steps: int) -> np.ndarray:
    """[len(seeds), n_steps] float64 draws in [0, 1), one stream per slot from its own seed.

    Sampling step t of slot b by inverse CDF at u[b, t] makes a seeded slot's answer independent
    of which slots share its batch (a resumed run then repeats an uninterrupted one)."""
    if not seeds:
        return np.zeros((0, n_steps))
    return np.stack([np.random.default_rng(int(s)).random(n_steps) for s in seeds])


GREEDY_BELOW = 1e-4  # a temperature this small samples the argmax (and 1/t cannot overflow)


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen, in transformers' order: logit bias, repetition penalty,
    then temperature, top-k and top-p. The first answer token is never a stop token.

    sampler: `plain` uses these fields as given; `model` takes top_k, top_p, the repetition
    penalty (and, when `temperature` is None, the temperature) from the checkpoint's
    generation_config, as transformers' `generate` does. seed: the call's seed (prompt i
    samples from prompt_seeds(seed)[i]); logit_bias: token id -> added logit (OpenAI's
    parameter, -100 bans a token); stop: strings that end an answer (cut before them)."""

    temperature: float | None = 1.0  # 0 is greedy
    top_p: float = 1.0  # 1 keeps every token
    top_k: int = 0  # 0 keeps every token
    repetition_penalty: float = 1.0  # > 1 discourages prompt and answer tokens already seen
    sampler: str = "plain"
    seed: int = 0
    logit_bias: dict[int, float] | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature < GREEDY_BELOW

    @property
    def mode(self) -> str:
        """`greedy` or `sample`: which slots of a batch draw."""
        return "greedy" if self.greedy else "sample"

    def for_model(self, generation_config: dict) -> Sampling:
        """This Sampling with the `model` sampler resolved against a generation_config."""
        if self.sampler == "plain":
            return self if self.temperature is not None else replace(self, temperature=1.0)
        holder = type("Config", (), {"generation_config": generation_config})
        opts = sampling_options(holder, "model", self.temperature)
        return replace(self, sampler="plain", **opts)


def check_projection_inputs(
    ids: list[list[int]], directions, rows: list[int], n_layers: int, hidden_size: int
) -> np.ndarray:
    """The directions of `token_projections` as float32 [V, len(rows), hidden], checked."""
    if not rows:
        raise PertokenError("no layers to trace: give at least one layer")
    check_capture_rows(list(rows), n_layers)
    d = np.asarray(directions, dtype=np.float32)
    if d.ndim != 3 or d.shape[1:] != (len(rows), hidden_size):
        raise PertokenError(
            f"directions have shape {list(d.shape)} but {len(rows)} rows of this model need "
            f"[vectors, {len(rows)}, {hidden_size}]: use vectors extracted from the same model"
        )
    if not ids or any(len(s) == 0 for s in ids):
        raise PertokenError("nothing to trace: every sequence needs at least one token")
    return d


# One Steer for every prompt, or a list with one Steer (or None: unsteered) per prompt.
SlotSteers = Steer | list[Steer | None] | None


def steer_slots(
    steer: SlotSteers, n: int, n_layers: int, hidden_size: int, dtype: str = "float32"
) -> list[Steer | None]:
    """Validated per-prompt steering: `steer` repeated for each of n prompts, or its own list."""
    plans = list(steer) if isinstance(steer, (list, tuple)) else [steer] * n
    if len(plans) != n:
        raise PertokenError(
            f"got {len(plans)} steering plans for {n} prompts: give one Steer (or None) per prompt"
        )
    for plan in plans:
        if plan is not None:
            plan.validate(n_layers, hidden_size, dtype)
    return plans


class Summaries(NamedTuple):
    """Per-sample means of the residual stream, each [N, n_layers + 1, hidden] float32."""

    prompt_avg: np.ndarray
    prompt_last: np.ndarray
    response_avg: np.ndarray

    @classmethod
    def of(cls, stacked: np.ndarray) -> Summaries:
        """From [N, n_layers + 1, 3, hidden], the kinds in SUMMARY_KINDS order (`w @ h`)."""
        return cls(*(stacked[:, :, k].copy() for k in range(3)))


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

# Called as each answer of `generate` ends: (index into the prompts, the answer's text), so a
# caller can save finished answers while the others are still decoding.
AnswerCallback = Callable[[int, str], None]


@dataclass
class Streaming:
    """What `generate` reports for every answer token while it decodes.

    rows: capture each token's hidden state at these rows (its own position, as `trace` does);
    logprobs: None for none, 0 for the chosen token's, k for the chosen token's and the top k;
    on_flush: called after a step's first tokens and after its decode step's reports (to hand
    them on together).
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
    model_type: str  # the config's model_type: "llama", "gemma2", ...
    dtype: str  # "float32", "bfloat16", ...
    device: str  # "cuda", "cpu", "mps", "gpu"
    generation_config: dict  # the checkpoint's generation_config.json (may be empty)
    context_length: int | None  # positions the model was trained for, when its config says

    @classmethod
    def load(cls, model: str, *, dtype: str | None = None, device: str | None = None) -> Backend:
        """Load a Hugging Face hub id or a local folder."""
        ...

    @classmethod
    def choose(cls, model: str, *, dtype: str | None, device: str | None) -> tuple[str, str]:
        """(device, dtype) that `load` will pick, without loading the model."""
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

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """A whole conversation ({"role", "content"} dicts) through the chat template."""
        ...

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (as `encode`) and each token's (start, end) character span."""
        ...

    def decode(self, ids: list[int]) -> str: ...

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
        """Answers to chat-templated prompts, decoded in `batch_size` refilled slots (see
        backends/generation.py; temperature, top_p, top_k, repetition_penalty and seed may be
        given as keywords instead of a Sampling)."""
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

    def token_projections(
        self,
        ids: list[list[int]],
        directions: np.ndarray,
        rows: list[int],
        *,
        steer: Steer | None = None,
        prompt_lens: list[int] | None = None,
        batch_size: int = 16,
    ) -> list[np.ndarray]:
        """Teacher-forced projections of every token, reduced on the device.

        directions: [V, len(rows), hidden] unit vectors. Returns per sequence a float32
        [T, len(rows), V + 1] array: [..., :V] = h . u at each row, [..., V] = |h|. Sequences
        run `batch_size` at a time, sorted by length; prompt_lens place `prompt`/`response`
        steering (default: the whole sequence is prompt)."""
        ...
