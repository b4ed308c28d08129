"""The options every stage shares, built once from the command line and passed whole:
which model (ModelChoice), how answers are generated (Generation), who judges them
(JudgeSettings). Frozen, so a stage cannot change what the next stage sees."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pertoken.backends.base import Sampling
from pertoken.backends.sampler import sampling_options


@dataclass(frozen=True)
class ModelChoice:
    """model: hub id, folder or .gguf; backend: auto, torch or mlx; dtype and device as the
    backend reads them (None: its default); compile: torch's compiled decode step."""

    model: str
    backend: str = "auto"
    dtype: str | None = None
    device: str | None = None
    compile: bool = False


@dataclass(frozen=True)
class Generation:
    """samples: answers per question; max_tokens: new tokens per answer; temperature None: the
    stage's default (see `sampling`); sampler
    `model` takes the checkpoint's generation_config (backends.sampler); seed: answer j of
    question i samples from its own seed, so answers do not depend on batching; batch_size:
    answers decoding at once (None: what memory holds)."""

    samples: int = 10
    max_tokens: int = 1000
    temperature: float | None = None
    sampler: str = "plain"
    seed: int = 0
    batch_size: int | None = None

    def sampling(self, backend, default: float = 1.0) -> Sampling:
        """The Sampling for `backend`. The greedy rule, written once: with no temperature
        given, one sample per question is the greedy answer, more sample at `default`; the
        `model` sampler takes what the checkpoint's generation_config says."""
        default = default if self.samples > 1 else 0.0
        opts = sampling_options(backend, self.sampler, self.temperature, default=default)
        return Sampling(seed=self.seed, **opts)

    def with_samples(self, samples: int) -> Generation:
        return replace(self, samples=samples)


@dataclass(frozen=True)
class JudgeSettings:
    """judge_model: an API model or `local:MODEL`; base_url: an OpenAI-compatible server;
    concurrency: requests in flight; cache: the score cache folder (None: the default);
    coherence_prompt: rubric text (None: the kit's or the judge's own); max_failures: failed
    requests in a row that stop the run."""

    judge_model: str
    base_url: str | None = None
    concurrency: int = 32
    cache: str | Path | None = None
    coherence_prompt: str | None = None
    max_failures: int = 8
