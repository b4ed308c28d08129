"""The shared fake backend, with instant hashed answers and a record of what it generated."""

from __future__ import annotations

import hashlib

from pertoken.backends.generation import SHORTHAND
from tests.fake_backend import FakeBackend


class RecordingBackend(FakeBackend):
    """Answers are hashes of (prompt, seed, position in the batch) or, with per-row seeds,
    of (prompt, row seed); with a comma and a newline in them."""

    def __init__(self, model_id: str = "org/fake-chat-1b"):
        super().__init__(model_id)
        self.generated: list[str] = []  # every prompt generate() answered, in call order
        self.generate_calls: list[dict] = []  # options of each generate() call

    def generate(self, prompts, *, seeds=None, **kw) -> list[str]:
        s = self._sampling(kw.get("sampling"), {k: kw[k] for k in SHORTHAND if k in kw})
        fields = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
        opts = dict(vars(s), max_new_tokens=kw.get("max_new_tokens", 1000), n=len(prompts))
        self.generate_calls.append({k: opts[k] for k in (*fields, "n")})
        if seeds is not None:  # per-row seeds: an answer does not depend on its batch
            self.keys = [(sd, 0) for sd in seeds]
        else:
            self.keys = [(s.seed, n) for n in range(len(prompts))]
        self.generated.extend(prompts)
        return super().generate(prompts, seeds=seeds, **kw)

    def _slots(self, batch, rows, length, on_flush=None):
        return _HashSlots(self)

    @staticmethod
    def answer(prompt: str, seed: int, n: int) -> str:
        h = hashlib.sha256(f"{prompt}|{seed}|{n}".encode()).hexdigest()[:8]
        return f"answer {h}, with a comma and a\nnewline"


class _HashSlots:
    """Every waiting entry ends at the next step with its hashed answer."""

    def __init__(self, backend: RecordingBackend):
        self.b, self.waiting = backend, []

    @property
    def busy(self):
        return bool(self.waiting)

    def insert(self, entry):
        self.waiting.append(entry)

    def step(self):
        e = self.waiting.pop(0)
        s, n = self.b.keys[e.prompt]
        e.answer = self.b.encode(self.b.answer(self.b.decode(e.ids), s, n))
        e.on_end(e)
