"""The PyTorch backend: transformers models with residual-stream hooks, on CUDA or CPU."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pertoken.backends.base import (
    AnswerCallback,
    RowSteers,
    Sampling,
    Steer,
    Streaming,
    Summaries,
    TokenCallback,
    TokenTrace,
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
from pertoken.backends.gguf import model_id as gguf_model_id
from pertoken.backends.plan import (
    PaddedBatch,
    TokenPieces,
    encode_pairs,
    encode_texts,
    left_pad,
    plan_batches,
    token_pieces,
)
from pertoken.backends.schedule import Answers, check_schedule, check_slots, prompt_seeds
from pertoken.backends.torch.compiled import CompiledDecoder
from pertoken.backends.torch.continuous import Request, Slots
from pertoken.backends.torch.decode import DecodeOptions, batch_tensors, decode, steer_tensor
from pertoken.backends.torch.hooks import (
    TapState,
    block_devices,
    decoder_parts,
    input_device,
    residual_taps,
)
from pertoken.backends.torch.load import load_model_and_tokenizer, pick_device, pick_dtype
from pertoken.backends.torch.static_cache import ATTENTION
from pertoken.backends.torch.steering import steer_state
from pertoken.backends.torch.stream import RowStream
from pertoken.errors import PertokenError
from pertoken.rows import check_capture_rows


class TorchBackend(ChatText):
    name = "torch"

    def __init__(
        self, model, tokenizer, *, model_id: str, dtype: str, device: str, compile: bool = False
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.dtype = dtype
        self.device = device
        layers, _ = decoder_parts(model)
        self.n_layers = len(layers)
        self.hidden_size = int(model.config.hidden_size)
        self.model_type = str(getattr(model.config, "model_type", "") or "")  # llama, gemma2
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        gen_config = getattr(model, "generation_config", None)
        stops = stop_token_ids(tokenizer, model.config, gen_config)
        self.stop_ids = torch.tensor(stops, device=device)
        self.generation_config = _set_fields(gen_config)
        # the static, CUDA-graph decode step (None: the eager loop)
        self.compiled = CompiledDecoder(model) if compile else None

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        compile: bool = False,
    ):
        """Load a hub id or local folder; device auto = cuda (sharded over several CUDA devices)
        else cpu, dtype auto = bf16 on cuda. compile: decode through the static step, captured
        as a CUDA graph on CUDA (`compiled.warmup_seconds` reports the capture time)."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        lm, tok = load_model_and_tokenizer(model, dtype, device)
        model_id = gguf_model_id(model) or (
            Path(model).name if Path(model).expanduser().is_dir() else model
        )
        device = str(input_device(lm)) if device == "auto" else device
        return cls(lm, tok, model_id=model_id, dtype=dtype, device=device, compile=compile)

    @classmethod
    def choose(cls, model: str, *, dtype: str | None = None, device: str | None = None):
        """(device, dtype) that `load` will pick."""
        device = pick_device(device)
        return device, pick_dtype(dtype, device)

    # ------------------------------------------------------------------ steering
    def _tap_state(self, steer: Steer | None) -> TapState:
        if steer is None:
            return TapState()
        steer.validate(self.n_layers, self.hidden_size, self.dtype)
        return TapState(steer=steer_state(self.model, [steer]))

    def _row_state(self, plans: list[Steer | None]) -> tuple[TapState, list[str]]:
        """Steering for one batch whose prompts carry their own terms (one line each)."""
        positions = [p.positions if p else None for p in plans]
        # one choice for the whole batch when the steered rows agree (the compiled step takes
        # only that); an unsteered row's lines are zero, so any choice leaves it alone
        given = {x for x in positions if x is not None}
        state = TapState(steer=steer_state(self.model, plans))
        if len(given) <= 1:
            return state, given.pop() if given else "all"
        return state, [x or "all" for x in positions]

    def _options(self, max_new_tokens, sampling: Sampling, steer, feed_last=False, positions=None):
        return DecodeOptions(
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            positions=positions or (steer.positions if steer else "all"),
            feed_last=feed_last,
        )

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
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
        """Batched answers.

        steer: one Steer for all prompts or one (or None) per prompt; seeds (one per prompt):
        each row samples from its own stream, whatever its batch; stream: per-token reports
        (token, logprobs, hidden states at stream.rows), whose callback may end an answer.
        Without seeds, each prompt's is derived from `seed` (prompt_seeds). schedule
        "continuous" (default): `batch_size` slots, each refilled with the next prompt as its
        answer ends; "static": length-sorted batches that run until their longest answer ends
        (also taken when streaming or with the compiled step); both give the same answers."""
        seqs = encode_texts(self.encode, prompts)
        plans = steer_rows(steer, len(seqs), self.n_layers, self.hidden_size, self.dtype)
        plans = decide(self, seqs, plans)
        if stream is not None:
            check_capture_rows(stream.rows, self.n_layers)
        sampling = Sampling(temperature, top_p, top_k, repetition_penalty)
        seeds = prompt_seeds(seed, len(seqs)) if seeds is None else seeds
        answers = Answers(len(seqs), self.decode, on_answer)
        batch_size = batch_size or self._auto_batch(max(map(len, seqs)) + max_new_tokens)
        if self._continuous(check_schedule(schedule), stream):
            self._uniforms(seeds, len(seqs), 0)  # one seed per prompt
            uniforms = row_uniforms(list(seeds), max_new_tokens) if temperature > 0 else None
            req = Request(seqs, plans, uniforms, sampling, max_new_tokens,
                          self.stop_ids, self.pad_id, answers.end)  # fmt: skip
            with residual_taps(self.model, TapState()) as state:
                Slots(self.model, req, check_slots(batch_size), state).run()
            return answers.texts
        uniforms = self._uniforms(seeds, len(seqs), max_new_tokens)  # [N, steps] or None
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            idx = batch.index.tolist()
            state, positions = self._row_state([plans[i] for i in idx])
            capture = bool(stream and stream.rows)
            opts = self._options(max_new_tokens, sampling, None, capture, positions)
            if uniforms is not None:
                opts = replace(opts, uniforms=uniforms[idx])
            feed = RowStream(stream, idx) if stream is not None else None
            if capture:
                state.rows, state.on_row = frozenset(stream.rows), feed.on_row
            with residual_taps(self.model, state):
                out = self._decode(batch, state, opts, gen, stream=feed)
            for i, ids in zip(idx, out):
                answers.end(i, ids)
        return answers.texts

    def _continuous(self, schedule: str, stream: Streaming | None) -> bool:
        """Whether this call decodes in refilled slots (see `generate`)."""
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        eager = self.compiled is None and stream is None and impl in ATTENTION
        return schedule == "continuous" and eager

    def _decode(self, batch, state, opts, gen, stream=None, **kw) -> list[list[int]]:
        """The eager decode loop, or the compiled step when the backend was loaded with it
        (streaming, and rows steered at different positions, take the eager loop)."""
        if self.compiled is not None and stream is None and isinstance(opts.positions, str):
            return self.compiled.decode(batch, state, opts, gen, **kw)
        return decode(self.model, batch, state, opts, gen, stream=stream, **kw)

    def _uniforms(self, seeds, n: int, steps: int) -> torch.Tensor | None:
        if seeds is None:
            return None
        if len(seeds) != n:
            raise PertokenError(f"{len(seeds)} seeds for {n} prompts: give one seed per prompt")
        wide = torch.float32 if self.device.startswith("mps") else torch.float64  # no f64 on MPS
        return torch.from_numpy(row_uniforms(list(seeds), steps)).to(self.device, wide)

    def _auto_batch(self, max_len: int) -> int:
        """Rows whose KV cache fits in 70% of free GPU memory (8 on the CPU), at most 128; a
        sharded model's cache is split like its blocks, so the fullest device decides."""
        if not self.device.startswith("cuda"):
            return 8
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        per_block = 2 * kv_heads * head_dim * max_len * self.model.dtype.itemsize  # one row
        blocks = Counter(block_devices(self.model))
        free = {d: torch.cuda.mem_get_info(d)[0] for d in blocks}
        rows = min(0.7 * free[d] // (n * per_block) for d, n in blocks.items())
        return int(max(1, min(128, rows)))

    @torch.inference_mode()
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
        """Generate one answer, capturing each answer token's hidden state at `rows`."""
        if not rows:
            raise PertokenError("no layers to trace: give at least one layer")
        check_capture_rows(rows, self.n_layers)
        (seq,) = encode_texts(self.encode, [prompt])
        steer = decide_one(self, seq, steer)
        state = self._tap_state(steer)
        state.rows = frozenset(rows)
        opts = self._options(max_new_tokens, Sampling(temperature), steer, feed_last=True)
        collector = _TraceCollector(self, rows, on_token)
        state.on_row = collector.on_row
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with residual_taps(self.model, state):
            (ids,) = self._decode(
                left_pad([seq], self.pad_id), state, opts, gen, on_token=collector.feeding
            )
        hidden = (
            np.stack(collector.states[: len(ids)])
            if ids
            else np.zeros((0, len(rows), self.hidden_size), np.float32)
        )
        return TokenTrace(
            prompt=prompt,
            text=self.decode(ids),
            tokens=token_pieces(self.decode, ids),
            token_ids=ids,
            rows=list(rows),
            hidden=hidden,
            meta=trace_meta(steer),
        )

    # ------------------------------------------------------------------ teacher-forced passes
    @torch.inference_mode()
    def summaries(self, prompts: list[str], answers: list[str], *, batch_size: int = 8):
        """prompt_avg, prompt_last, response_avg per sample, each [N, n_layers+1, hidden]."""
        seqs, prompt_lens = encode_pairs(self.encode, prompts, answers)
        out = np.zeros((len(seqs), self.n_layers + 1, 3, self.hidden_size), np.float32)
        for batch in plan_batches(
            seqs, self.pad_id, prompt_lens=prompt_lens, batch_size=batch_size
        ):
            out[batch.index] = self._means(batch)
        return Summaries.of(out)

    def _means(self, batch: PaddedBatch) -> np.ndarray:
        """[B, n_layers + 1, 3, hidden]: `w @ h` at every row inside one forward."""
        ids, attn, pos = batch_tensors(batch, self.device)
        w = torch.from_numpy(batch.summary_weights()).to(self.device)  # [B, 3, T]
        means: dict[int, torch.Tensor] = {}  # row -> [B, 3, hidden]
        state = TapState(rows=frozenset(range(self.n_layers + 1)))
        state.on_row = lambda row, h: means.__setitem__(row, w @ h.float())
        with residual_taps(self.model, state):
            self.model.get_decoder()(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False
            )
        return torch.stack([means[r] for r in sorted(means)], 1).cpu().numpy()

    @torch.inference_mode()
    def logits(self, text: str, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, vocab] float32 logits of one text; prompt_len places `prompt`/`response` steering."""
        (seq,) = encode_texts(self.encode, [text])
        batch = left_pad([seq], self.pad_id, prompt_lens=[prompt_len or len(seq)])
        steer = decide_one(self, seq[: prompt_len or len(seq)], steer)
        state = self._tap_state(steer)
        if steer is not None:
            state.steer_mask = steer_tensor(batch, steer.positions, self.device)
        ids, attn, _ = batch_tensors(batch, self.device)
        with residual_taps(self.model, state):
            out = self.model(input_ids=ids, attention_mask=attn, use_cache=False)
        return out.logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """[N, vocab] float32 log-probabilities of the next token after each prompt."""
        seqs = encode_texts(self.encode, prompts)
        out: np.ndarray | None = None
        for batch in plan_batches(seqs, self.pad_id, batch_size=batch_size):
            ids, attn, pos = batch_tensors(batch, self.device)
            last = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]  # [B, vocab]
            out = np.zeros((len(seqs), last.shape[-1]), np.float32) if out is None else out
            out[batch.index] = torch.log_softmax(last.float(), -1).cpu().numpy()
        return out

    # ------------------------------------------------------------------ per-token traces
    def token_projections(
        self, ids, directions, rows, *, steer=None, prompt_lens=None, batch_size=16
    ):
        """Per sequence float32 [T, len(rows), V + 1]: h . u per unit direction, then |h|."""
        from pertoken.backends.torch.trace_batch import token_projections

        if steer is not None and steer.conditional:
            return conditional_projections(
                self.token_projections, ids, directions, rows, steer, prompt_lens, batch_size
            )
        return token_projections(
            self, ids, directions, rows, steer=steer, prompt_lens=prompt_lens, batch_size=batch_size
        )


def _set_fields(gen_config) -> dict:
    """The fields a checkpoint's generation config sets (transformers leaves the rest None)."""
    if gen_config is None:
        return {}
    return {k: v for k, v in gen_config.to_dict().items() if v is not None}


class _TraceCollector:
    """Groups the rows captured at each decode step into one [len(rows), hidden] state."""

    def __init__(self, backend: TorchBackend, rows: list[int], on_token: TokenCallback | None):
        self.rows, self.on_token = list(rows), on_token
        self.states: list[np.ndarray] = []
        self.pieces = TokenPieces(backend.decode)
        self.token: int | None = None  # the token being fed, whose states come next
        self.pending: dict[int, np.ndarray] | None = None

    def feeding(self, tokens: list[int]) -> None:
        self.token = tokens[0]
        self.pending = {}

    def on_row(self, row: int, h: torch.Tensor) -> None:
        if self.pending is None:  # the prefill forward: prompt positions are not traced
            return
        self.pending[row] = h[0, -1].float().cpu().numpy()
        if len(self.pending) == len(set(self.rows)):
            state = np.stack([self.pending[r] for r in self.rows])  # [len(rows), hidden]
            self.states.append(state)
            self.pending = {}
            if self.on_token is not None:
                self.on_token(len(self.states) - 1, self.pieces.add(self.token), state)
