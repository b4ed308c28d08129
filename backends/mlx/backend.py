"""MLXBackend: the Backend protocol on pertoken's own MLX models (Apple Silicon; CPU for tests)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from pertoken.backends import machine
from pertoken.backends.base import (
    AnswerCallback,
    RowSteers,
    Sampling,
    Steer,
    Streaming,
    Summaries,
    TokenCallback,
    TokenStep,
    TokenTrace,
    check_projection_inputs,
    row_uniforms,
    steer_rows,
)
from pertoken.backends.chat import ChatText, stop_token_ids
from pertoken.backends.conditions import (
    conditional_projections,
    decide,
    decide_one,
    trace_meta,
)
from pertoken.backends.memory import HEADROOM, MAX_BATCH, kv_bytes_per_token
from pertoken.backends.mlx.batch import SteerPlan
from pertoken.backends.mlx.continuous import Request, Slots
from pertoken.backends.mlx.decode import decode
from pertoken.backends.mlx.load import (
    DTYPES,
    Loaded,
    generation_config,
    load,
    local_config,
    pick_device,
    pick_dtype,
)
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.summaries import summarize
from pertoken.backends.plan import (
    TokenPieces,
    encode_pairs,
    encode_texts,
    left_pad,
    plan_batches,
    token_pieces,
)
from pertoken.backends.schedule import Answers, check_schedule, check_slots, prompt_seeds
from pertoken.errors import PertokenError
from pertoken.rows import check_capture_rows


class MLXBackend(ChatText):
    name = "mlx"

    def __init__(self, loaded: Loaded):
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.model_id = loaded.model_id
        self.n_layers = len(self.model.layers)
        self.hidden_size = int(self.config["hidden_size"])
        self.model_type = str(self.config.get("model_type") or "")  # llama, gemma2
        self.context_length = self.config.get("max_position_embeddings")
        self.dtype, self.device = loaded.dtype, loaded.device
        self.generation_config = generation_config(loaded.path)
        configs = [SimpleNamespace(**c) for c in (self.config, self.generation_config)]
        self.stop = set(stop_token_ids(self.tokenizer, *configs))
        pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.prefill_chunk = CHUNK  # input tokens per forward over a prompt or a text

    @classmethod
    def load(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """Load a Hugging Face folder or hub id, or an mlx-community quantized repo."""
        return cls(load(model, dtype=dtype, device=device))

    @classmethod
    def choose(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """(device, dtype) that `load` will pick; the checkpoint's half type is read from its
        config when it is on disk, else bfloat16 is assumed."""
        device = pick_device(device)
        return device, pick_dtype(dtype, local_config(model), device)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 1000,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        steer: RowSteers = None,
        batch_size: int | None = None,
        seeds: list[int] | None = None,
        stream: Streaming | None = None,
        schedule: str = "continuous",
        on_answer: AnswerCallback | None = None,
    ) -> list[str]:
        """Answers to chat-templated prompts (temperature 0 is greedy).

        steer: one Steer for all prompts or one (or None) per prompt; seeds (one per prompt):
        each row samples from its own stream, whatever its batch; stream: per-token reports
        (token, logprobs, hidden states at stream.rows), whose callback may end an answer.
        Without seeds, each prompt's is derived from `seed` (prompt_seeds). schedule
        "continuous" (default): `batch_size` slots, each refilled with the next prompt as its
        answer ends; "static": length-sorted batches that run until their longest answer ends
        (also taken when streaming); both give the same answers."""
        seqs = encode_texts(self.encode, prompts)
        plans = steer_rows(steer, len(seqs), self.n_layers, self.hidden_size, self.dtype)
        plans = decide(self, seqs, plans)
        if stream is not None:
            check_capture_rows(stream.rows, self.n_layers)
        continuous = check_schedule(schedule) == "continuous" and stream is None
        if seeds is None:
            seeds = prompt_seeds(seed, len(seqs))
        if len(seeds) != len(seqs):
            raise PertokenError(f"{len(seeds)} seeds for {len(seqs)} prompts: give one per prompt")
        uniforms = row_uniforms(list(seeds), max_new_tokens)
        sampling = Sampling(temperature, top_p, top_k, repetition_penalty)
        answers = Answers(len(seqs), self.decode, on_answer)
        batch_size = batch_size or self._auto_batch(max(map(len, seqs)) + max_new_tokens)
        if continuous:
            req = Request(seqs, plans, uniforms, sampling, max_new_tokens, self.stop,
                          self.hidden_size, self._mx_dtype, self.prefill_chunk,
                          answers.end)  # fmt: skip
            Slots(self.model, req, check_slots(batch_size)).run()
            return answers.texts
        mx.random.seed(seed)
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            idx = batch.index
            plan = SteerPlan.per_row([plans[i] for i in idx], self.hidden_size, self._mx_dtype)
            out = decode(
                self.model, batch, max_new_tokens=max_new_tokens, sampling=sampling,
                stop=self.stop, steer=plan, chunk=self.prefill_chunk,
                uniforms=None if uniforms is None else uniforms[idx],
                **_stream_kw(stream, idx),
            )  # fmt: skip
            for i, a in zip(idx, out, strict=True):
                answers.end(int(i), a.ids)
        return answers.texts

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
        """One answer with each answer token's hidden state at `rows` ([T, len(rows), hidden])."""
        rows = [int(r) for r in rows]
        if not rows:
            raise PertokenError("no layers to trace: give at least one layer")
        check_capture_rows(rows, self.n_layers)
        (ids,) = encode_texts(self.encode, [prompt])
        steer = decide_one(self, ids, steer)
        pieces = TokenPieces(self.decode)

        def on_hidden(b: int, i: int, token: int, h: np.ndarray, _lp) -> None:
            piece = pieces.add(token)
            if on_token is not None:
                on_token(i, piece, h)

        mx.random.seed(seed)
        (answer,) = decode(
            self.model, left_pad([ids], self.pad_id), max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature), stop=self.stop, steer=self._plan(steer), rows=rows,
            report=on_hidden, chunk=self.prefill_chunk,
        )  # fmt: skip
        hidden = (
            np.stack(answer.hidden)
            if answer.hidden
            else np.zeros((0, len(rows), self.hidden_size), np.float32)
        )
        meta = {"backend": self.name, "model": self.model_id, "temperature": temperature}
        meta |= trace_meta(steer)
        return TokenTrace(
            prompt, self.decode(answer.ids), token_pieces(self.decode, answer.ids), answer.ids,
            rows, hidden.astype(np.float32), meta,
        )  # fmt: skip

    # ------------------------------------------------------------------ forward-only
    def summaries(self, prompts: list[str], answers: list[str], *, batch_size: int = 8):
        """prompt_avg, prompt_last, response_avg per sample, each [N, n_layers + 1, hidden]."""
        seqs, prompt_lens = encode_pairs(self.encode, prompts, answers)
        out = np.zeros((len(seqs), self.n_layers + 1, 3, self.hidden_size), np.float32)
        for batch in plan_batches(
            seqs, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size
        ):
            out[batch.index] = summarize(self.model, batch, self.prefill_chunk)
        return Summaries.of(out)

    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text (no special tokens added)."""
        (ids,) = encode_texts(self.encode, [text])
        plen = len(ids) if prompt_len is None else int(prompt_len)
        steer = decide_one(self, ids[:plen], steer)
        batch, plan = left_pad([ids], self.pad_id, prompt_lens=[plen]), self._plan(steer)
        kw = {}
        if plan is not None:
            kw = {"steer": plan.vectors, "steer_on": plan.prefill_on(batch)}
        out = prefill(self.model, batch, chunk=self.prefill_chunk, head="all", **kw)
        return np.array(out[0].astype(mx.float32))

    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the token after each prompt."""
        seqs = encode_texts(self.encode, prompts)
        out: np.ndarray | None = None
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            last = prefill(self.model, batch, chunk=self.prefill_chunk, head="last")
            logits = last[:, -1].astype(mx.float32)  # [B, vocab]
            lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            out = np.zeros((len(seqs), lp.shape[1]), np.float32) if out is None else out
            out[batch.index] = lp
        return out

    # ------------------------------------------------------------------ per-token traces
    def token_projections(
        self, ids, directions, rows, *, steer=None, prompt_lens=None, batch_size=16
    ):
        """Per sequence float32 [T, len(rows), V + 1]: h . u per unit direction, then |h|."""
        from pertoken.backends.mlx.trace_batch import token_projections

        if steer is not None and steer.conditional:
            return conditional_projections(
                self.token_projections, ids, directions, rows, steer, prompt_lens, batch_size
            )
        d = check_projection_inputs(ids, directions, rows, self.n_layers, self.hidden_size)
        batches = plan_batches(ids, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size)
        return token_projections(
            self.model, d, [int(r) for r in rows], batches, plan=self._plan(steer),
            chunk=self.prefill_chunk,
        )  # fmt: skip

    # ------------------------------------------------------------------ helpers
    def _plan(self, steer: Steer | None) -> SteerPlan | None:
        if steer is None:
            return None
        steer.validate(self.n_layers, self.hidden_size, self.dtype)
        return SteerPlan.of(steer, self._mx_dtype)

    @property
    def _mx_dtype(self):
        return DTYPES[self.dtype]

    def _auto_batch(self, max_len: int) -> int:
        """Rows whose KV cache fits in what Metal may still use (its recommended working set
        less what MLX holds, the weights first), at most MAX_BATCH; 8 without Metal."""
        if not mx.metal.is_available():
            return 8
        budget, _ = machine.mlx_budget()
        per_token = kv_bytes_per_token(self.config, self.dtype)
        if not budget or not per_token:
            return 8
        free = budget * (1 - HEADROOM) - mx.get_active_memory()
        return int(max(1, min(MAX_BATCH, free // (per_token * max_len))))


def _stream_kw(stream: Streaming | None, idx: np.ndarray) -> dict:
    """decode() options that turn its per-row reports into TokenSteps for the prompts in idx."""
    if stream is None:
        return {}

    def report(b: int, i: int, token: int, h, lp) -> bool | None:
        step = TokenStep(int(idx[b]), i, token, h)
        if lp is not None:
            step.logprob, step.top = lp
        return stream.on_step(step)

    return {
        "rows": list(stream.rows) or None,
        "report": report,
        "logprobs": stream.logprobs,
        "flush": stream.on_flush,
    }
