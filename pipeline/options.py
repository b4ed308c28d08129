"""The options every stage shares, built once from the command line and passed whole:
which model (ModelChoice), how answers are generated (Generation), who judges them
(JudgeSettings), how judged pairs become vectors (Extraction). Frozen, so a stage cannot
change what the next stage sees."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pertoken.backends.sampler import sampling_options
from pertoken.pipeline.judge.rubrics import DEFAULT_JUDGE

if TYPE_CHECKING:
    from pertoken.backends.base import Sampling


@dataclass(frozen=True)
class ModelChoice:
    """model: hub id, folder or .gguf; backend: auto, torch or mlx; dtype and device as the
    backend reads them (None: its default); compile: torch's compiled decode step."""

    model: str
    backend: str = "auto"
    dtype: str | None = None
    device: str | None = None
    compile: bool = False

    def load(self):
        """The loaded Backend (imported here: the pipeline never imports torch or mlx)."""
        from pertoken.backends import load_backend

        kw = dict(dtype=self.dtype, device=self.device, compile=self.compile)
        return load_backend(self.model, self.backend, **kw)


@dataclass(frozen=True)
class Generation:
    """samples: answers per question; max_tokens: new tokens per answer; temperature None:
    the stage's default (see `sampling`); sampler `model` takes the checkpoint's
    generation_config (backends.sampler); seed: answer j of question i samples from its own
    seed, so answers do not depend on batching; batch_size: answers decoding at once (None:
    what memory holds)."""

    samples: int = 10
    max_tokens: int = 1000
    temperature: float | None = None
    sampler: str = "plain"
    seed: int = 0
    batch_size: int | None = None

    def sampling(self, backend, default: float = 1.0) -> Sampling:
        """The Sampling for `backend`, with `keywords`' temperature rule."""
        from pertoken.backends.base import Sampling  # numpy: not at import, for a light --help

        opts = self.keywords(backend, default)
        return Sampling(**{k: v for k, v in opts.items() if k != "max_new_tokens"})

    def keywords(self, backend, default: float = 1.0) -> dict:
        """`backend.generate`'s keywords: max_new_tokens, seed and the sampler's fields.

        The greedy rule, written once: with no temperature given, one sample per question
        is the greedy answer, more sample at `default`; the `model` sampler takes what the
        checkpoint's generation_config says."""
        default = default if self.samples > 1 else 0.0
        opts = sampling_options(backend, self.sampler, self.temperature, default=default)
        return dict(max_new_tokens=self.max_tokens, seed=self.seed, **opts)

    def with_samples(self, samples: int) -> Generation:
        return replace(self, samples=samples)


@dataclass(frozen=True)
class JudgeSettings:
    """judge_model: an API model or `local:MODEL`; base_url: an OpenAI-compatible server;
    concurrency: requests in flight; cache: the score cache (None: the default);
    coherence_prompt: rubric text (None: the kit's or the judge's own); max_failures: failed
    requests in a row that stop the run."""

    judge_model: str = DEFAULT_JUDGE
    base_url: str | None = None
    concurrency: int = 32
    cache: str | Path | None = None
    coherence_prompt: str | None = None
    max_failures: int = 8


@dataclass(frozen=True)
class Extraction:
    """threshold: the trait score cut T for keeping a pair; method: mean_diff, or probe
    (also a logistic-regression vector); batch_size: pairs read at once; min_pairs: fewest
    kept pairs accepted."""

    threshold: float = 50.0
    method: str = "mean_diff"
    batch_size: int = 8
    min_pairs: int = 1


# The flat option names `pertoken run` and a sweep plan's [run] table use, per object.
FLAT_NAMES = {
    ModelChoice: {"model": "model", "backend": "backend", "dtype": "dtype",
                  "device": "device", "compile": "compile"},
    Generation: {"n_per_question": "samples", "max_new_tokens": "max_tokens",
                 "temperature": "temperature", "sampler": "sampler", "seed": "seed",
                 "batch_size": "batch_size"},
    JudgeSettings: {"judge_model": "judge_model", "base_url": "base_url",
                    "concurrency": "concurrency", "cache": "cache",
                    "coherence_prompt": "coherence_prompt",
                    "max_consecutive_failures": "max_failures"},
    Extraction: {"threshold": "threshold", "method": "method"},
}  # fmt: skip


def from_flat(kind: type, options: dict, **given):
    """A `kind` from flat option names (`n_per_question`, `max_consecutive_failures`, ...);
    names of other objects are ignored, `given` fields are taken as they are."""
    names = FLAT_NAMES[kind]
    return kind(**{names[k]: v for k, v in options.items() if k in names}, **given)


def flat_names() -> list[str]:
    """Every flat option name of the four objects."""
    return [name for names in FLAT_NAMES.values() for name in names]
