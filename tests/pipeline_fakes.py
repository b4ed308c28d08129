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
        schedule="continuous",
        on_answer=None,
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
        if seeds is not None:  # per-row seeds: an answer does not depend on its batch
            keys = [(s, 0) for s in seeds]
        else:
            keys = [(seed, n) for n in range(len(prompts))]
        answers = []
        for k, (p, (s, n)) in enumerate(zip(prompts, keys, strict=True)):
            answers.append(self.answer(p, s, n))
            self.generated.append(p)
            if on_answer is not None:
                on_answer(k, answers[-1])
        return answers

    @staticmethod
    def answer(prompt: str, seed: int, n: int) -> str:
        h = hashlib.sha256(f"{prompt}|{seed}|{n}".encode()).hexdigest()[:8]
        return f"answer {h}, with a comma and a\nnewline"
