"""A Backend that needs no weights: deterministic answers and summaries for pipeline tests."""

from __future__ import annotations

import hashlib

import numpy as np

from pertoken.backends.base import Summaries, TokenTrace


def text_features(text: str, n_rows: int, hidden: int) -> np.ndarray:
    """[n_rows, hidden] float32, a deterministic function of `text`."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal((n_rows, hidden)).astype(np.float32)


class FakeBackend:
    name = "fake"
    dtype = "float32"
    device = "cpu"

    def __init__(self, model_id: str = "fake-model", n_layers: int = 3, hidden_size: int = 8):
        self.model_id, self.n_layers, self.hidden_size = model_id, n_layers, hidden_size
        self.generated: list[str] = []  # every prompt generate() answered, in call order
        self.generate_calls: list[dict] = []  # options of each generate() call
        self.summarized = 0

    @classmethod
    def load(cls, model: str, *, dtype=None, device=None):
        return cls(model)

    def chat_prompt(self, system: str | None, user: str) -> str:
        head = f"<sys>{system}</sys>" if system else ""
        return f"{head}<user>{user}</user><assistant>"

    def encode(self, text: str) -> list[int]:
        return [sum(word.encode()) % 256 for word in text.split()]  # one token per word

    def decode(self, ids: list[int]) -> str:
        return " ".join(chr(i) for i in ids)

    def generate(
        self,
        prompts,
        *,
        max_new_tokens=1000,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        steer=None,
        batch_size=None,
    ) -> list[str]:
        self.generate_calls.append(
            dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, n=len(prompts))
        )
        self.generated.extend(prompts)
        return [self.answer(p, seed, n) for n, p in enumerate(prompts)]

    @staticmethod
    def answer(prompt: str, seed: int, n: int) -> str:
        h = hashlib.sha256(f"{prompt}|{seed}|{n}".encode()).hexdigest()[:8]
        return f"answer {h}, with a comma and a\nnewline"

    def summaries(self, prompts, answers, *, batch_size: int = 8) -> Summaries:
        self.summarized += len(prompts)
        rows, h = self.n_layers + 1, self.hidden_size
        pa = np.stack([text_features("prompt" + p, rows, h) for p in prompts])
        pl = np.stack([text_features("last" + p[-1:], rows, h) for p in prompts])
        ra = np.stack([text_features("answer" + a, rows, h) for a in answers])
        return Summaries(pa, pl, ra)  # each [N, n_layers + 1, hidden]

    def trace(
        self,
        prompt,
        *,
        max_new_tokens=200,
        rows,
        steer=None,
        temperature=0.0,
        seed=0,
        on_token=None,
    ) -> TokenTrace:
        text = self.answer(prompt, seed, 0)
        hidden = np.zeros((0, len(rows), self.hidden_size), np.float32)
        return TokenTrace(prompt, text, [], [], list(rows), hidden)

    def logits(self, text, *, steer=None, prompt_len=None) -> np.ndarray:
        return np.zeros((len(self.encode(text)), 256), np.float32)

    def next_token_logprobs(self, prompts, *, batch_size: int = 8) -> np.ndarray:
        return np.full((len(prompts), 256), -np.log(256), np.float32)
