"""MLXBackend: the Backend protocol on pertoken's own MLX models (Apple Silicon; CPU for tests)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from pertoken.backends.base import (
    RowSteers,
    Steer,
    Streaming,
    Summaries,
    TokenCallback,
    TokenStep,
    TokenTrace,
    steer_rows,
)
from pertoken.backends.chat import render_chat, render_messages, stop_token_ids
from pertoken.backends.mlx.batch import Batch, SteerPlan, full_pass, window_of
from pertoken.backends.mlx.decode import decode, make_sampler
from pertoken.backends.mlx.load import DTYPES, Loaded, generation_config, load
from pertoken.backends.mlx.summaries import summarize
from pertoken.errors import PertokenError
from pertoken.rows import check_capture_rows


class MLXBackend:
    name = "mlx"

    def __init__(self, loaded: Loaded):
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.model_id = loaded.model_id
        self.n_layers = len(self.model.layers)
        self.hidden_size = int(self.config["hidden_size"])
        self.context_length = self.config.get("max_position_embeddings")
        self.dtype, self.device = loaded.dtype, loaded.device
        configs = [SimpleNamespace(**c) for c in (self.config, generation_config(loaded.path))]
        self.stop = set(stop_token_ids(self.tokenizer, *configs))
        pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def load(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """Load a Hugging Face folder or hub id, or an mlx-community quantized repo."""
        return cls(load(model, dtype=dtype, device=device))

    # ------------------------------------------------------------------ text
    def chat_prompt(self, system: str | None, user: str) -> str:
        """Chat template with the generation prompt; no system role -> "{system}\n\n{user}"."""
        return render_chat(self.tokenizer, system, user)

    def chat_messages(self, messages: list[dict]) -> str:
        return render_messages(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
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
        """Answers to chat-templated prompts, batched by length (temperature 0 is greedy).

        steer: one Steer for all prompts or one (or None) per prompt; stream: per-token reports
        (token, logprobs, hidden states at stream.rows), whose callback may end an answer."""
        seqs = self._encode_all(prompts)
        plans = steer_rows(steer, len(seqs), self.n_layers, self.hidden_size)
        if stream is not None:
            check_capture_rows(stream.rows, self.n_layers)
        sample = make_sampler(temperature, top_p)
        mx.random.seed(seed)
        out: list[str] = [""] * len(seqs)
        for idx in _chunks(seqs, batch_size or 8):
            lens = np.array([len(seqs[i]) for i in idx])
            plan = SteerPlan.per_row([plans[i] for i in idx], self.hidden_size, self._mx_dtype)
            answers = decode(
                self.model, Batch.of([seqs[i] for i in idx], self.pad_id), prompt_lens=lens,
                max_new_tokens=max_new_tokens, sample=sample, stop=self.stop, steer=plan,
                **_stream_kw(stream, idx),
            )  # fmt: skip
            for i, a in zip(idx, answers, strict=True):
                out[i] = self.decode(a.ids)
        return out

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
        ids = self._encode_all([prompt])[0]
        pieces = _Pieces(self)

        def on_hidden(b: int, i: int, token: int, h: np.ndarray, _lp) -> None:
            piece = pieces.add(token)
            if on_token is not None:
                on_token(i, piece, h)

        mx.random.seed(seed)
        (answer,) = decode(
            self.model, Batch.of([ids], self.pad_id), prompt_lens=np.array([len(ids)]),
            max_new_tokens=max_new_tokens, sample=make_sampler(temperature, 1.0),
            stop=self.stop, steer=self._plan(steer), rows=rows, report=on_hidden,
        )  # fmt: skip
        hidden = (
            np.stack(answer.hidden)
            if answer.hidden
            else np.zeros((0, len(rows), self.hidden_size), np.float32)
        )
        meta = {"backend": self.name, "model": self.model_id, "temperature": temperature}
        return TokenTrace(
            prompt, self.decode(answer.ids), pieces.pieces, answer.ids, rows,
            hidden.astype(np.float32), meta,
        )  # fmt: skip

    # ------------------------------------------------------------------ forward-only
    def summaries(self, prompts: list[str], answers: list[str], *, batch_size: int = 8):
        """prompt_avg, prompt_last, response_avg per sample, each [N, n_layers + 1, hidden]."""
        if len(prompts) != len(answers):
            raise PertokenError(f"{len(prompts)} prompts but {len(answers)} answers")
        seqs = self._encode_all([p + a for p, a in zip(prompts, answers, strict=True)])
        plens = np.array([len(self.encode(p)) for p in prompts])
        out = np.zeros((len(seqs), self.n_layers + 1, 3, self.hidden_size), np.float32)
        for idx in _chunks(seqs, batch_size):
            batch = Batch.of([seqs[i] for i in idx], self.pad_id)
            out[idx] = summarize(self.model, batch, plens[idx])
        return Summaries(out[:, :, 0].copy(), out[:, :, 1].copy(), out[:, :, 2].copy())

    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text (no special tokens added)."""
        ids = self._encode_all([text])[0]
        batch, plan = Batch.of([ids], self.pad_id), self._plan(steer)
        kw = {}
        if plan is not None:
            plen = np.array([len(ids) if prompt_len is None else int(prompt_len)])
            kw = {"steer": plan.vectors, "steer_on": plan.prefill_on(batch, plen)}
        out = self.model(batch.ids, None, full_pass(batch, window_of(self.model), **kw))
        return np.array(out[0].astype(mx.float32))

    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the token after each prompt."""
        seqs = self._encode_all(prompts)
        out: np.ndarray | None = None
        for idx in _chunks(seqs, batch_size):
            batch = Batch.of([seqs[i] for i in idx], self.pad_id)
            p = full_pass(batch, window_of(self.model), head="last")
            logits = self.model(batch.ids, None, p)[:, -1].astype(mx.float32)  # [B, vocab]
            lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            out = np.zeros((len(seqs), lp.shape[1]), np.float32) if out is None else out
            out[idx] = lp
        return out

    # ------------------------------------------------------------------ helpers
    def _encode_all(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            raise PertokenError("no prompts given: pass at least one prompt")
        seqs = [self.encode(t) for t in texts]
        if any(not s for s in seqs):
            raise PertokenError("a prompt is empty after tokenization: every prompt needs text")
        return seqs

    def _plan(self, steer: Steer | None) -> SteerPlan | None:
        if steer is None:
            return None
        steer.validate(self.n_layers, self.hidden_size)
        return SteerPlan.of(steer, self._mx_dtype)

    @property
    def _mx_dtype(self):
        return DTYPES[self.dtype]


def _chunks(seqs: list[list[int]], size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (less padding)."""
    if size < 1:
        raise PertokenError(f"batch size must be at least 1, not {size}")
    order = np.argsort([len(s) for s in seqs], kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


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


class _Pieces:
    """Text piece of each answer token, by decoding the growing answer."""

    def __init__(self, backend: MLXBackend):
        self.backend, self.ids, self.text, self.pieces = backend, [], "", []

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.backend.decode(self.ids)
        piece = (
            text[len(self.text) :] if text.startswith(self.text) else self.backend.decode([token])
        )
        self.text = text
        self.pieces.append(piece)
        return piece
