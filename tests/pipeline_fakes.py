"""The shared fake backend, with instant hashed answers and a record of what it generated."""

from __future__ import annotations

import hashlib

from tests.fake_backend import FakeBackend


class RecordingBackend(FakeBackend):
    """Answers are hashes of (prompt, seed, position in the batch) or, with per-row seeds,
    of (prompt, row seed); with a comma and a newline in them."""

    def __init__(self, model_id: str = "org/fake-chat-1b"):
        super().__init__(model_id)
        self.generated: list[str] = []  # every prompt generate() answered, in call order
        self.generate_calls: list[dict] = []  # options of each generate() call

    def generate(
        self,
        prompts,
        *,
        max_new_tokens=1000,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        seed=0,
        steer=None,
        batch_size=None,
        seeds=None,
    ) -> list[str]:
        self.generate_calls.append(
            dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repetition_penalty,
                seed=seed,
                n=len(prompts),
            )
        )
        self.generated.extend(prompts)
        if seeds is not None:  # per-row seeds: an answer does not depend on its batch
            return [self.answer(p, s, 0) for p, s in zip(prompts, seeds, strict=True)]
        return [self.answer(p, seed, n) for n, p in enumerate(prompts)]

    @staticmethod
    def answer(prompt: str, seed: int, n: int) -> str:
        h = hashlib.sha256(f"{prompt}|{seed}|{n}".encode()).hexdigest()[:8]
        return f"answer {h}, with a comma and a\nnewline"
