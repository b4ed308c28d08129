"""Judges: fill rows' `{trait}` and `coherence` cells with logprob-weighted scores.

The stages take a `Judge` (`judge_csv`, `evaluate`, `search_coefs`); `make_judge` is the one
way `judge`, `eval` and `run` make one. Every score goes through the disk cache, and the scorer
behind it (an API judge, or a local model) is made only when some score is not cached.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import format_score
from pertoken.pipeline.judge.cache import JudgeCache, cache_key
from pertoken.pipeline.judge.rubrics import judge_identity, rubrics
from pertoken.pipeline.options import JudgeSettings, ModelChoice
from pertoken.traits import Trait, fill_rubric


class Scorer(Protocol):
    """Scores (cache key, filled rubric) items: an ApiJudge or a LocalJudge."""

    requests: int  # calls made so far

    def run(self, items, on_done, on_fail, on_retry=None) -> None: ...


class Judge(Protocol):
    identity: dict | None  # judge_identity(): model, server, rubric digests (None: unknown)

    def judge_rows(self, rows: list[dict]) -> list[dict]:
        """Fill each row's `{trait}` and `coherence` cells ("" when missing); return `rows`."""
        ...


@dataclass
class Tally:
    """What judging some rows took; per rubric (trait name, `coherence`) where a dict."""

    requests: int  # judge calls made (0 when everything was cached)
    cached: int  # scores found in the cache
    refused: dict[str, int]  # too little mass on numbers
    failed: dict[str, int]  # no score after the retries


class CachedJudge:
    """A Judge whose scores go through the disk cache; `scorer()` is called on first need."""

    def __init__(
        self, trait: Trait, settings: JudgeSettings, scorer: Callable[[], Scorer], progress=True
    ):
        s = settings
        self.trait, self.judge_model, self.base_url = trait, s.judge_model, s.base_url
        self.scorer, self.cache, self.progress = functools.cache(scorer), s.cache, progress
        self.rubrics = rubrics(trait, s.coherence_prompt)
        self.identity = judge_identity(trait, s.judge_model, s.base_url, s.coherence_prompt)

    def judge_rows(self, rows: list[dict]) -> list[dict]:
        self.tally(rows)
        return rows

    def tally(self, rows: list[dict], label: str = "judge") -> Tally:
        """Judge `rows` in place, as judge_rows, and say what it took; label names the bar."""
        server = self.identity["judge_base_url"]
        keys = {
            (n, m): cache_key(self.judge_model, server, rubric, r["question"], r["answer"])
            for n, r in enumerate(rows)
            for m, rubric in self.rubrics.items()
        }
        scores, requests, cached = self._scores(keys, rows, label)
        for (n, m), key in keys.items():
            rows[n][m] = format_score(scores.get(key))
        per = {m: [keys[(n, m)] for n in range(len(rows))] for m in self.rubrics}
        refused = {m: sum(k in scores and scores[k] is None for k in ks) for m, ks in per.items()}
        failed = {m: sum(k not in scores for k in ks) for m, ks in per.items()}
        return Tally(requests, cached, refused, failed)

    def check(self, *, reach: bool = True) -> None:
        """Before hours of work: an API judge's key is there and, with `reach`, its server
        answers; a local judge is checked when it loads."""
        if self.judge_model.startswith("local:"):
            return
        from pertoken.pipeline.judge.api import api_key, check_endpoint

        if reach:
            check_endpoint(self.base_url)
        else:
            api_key(self.base_url)

    def _scores(self, keys: dict, rows: list[dict], label: str):
        """({cache key: score or None}, calls made, scores found cached)."""
        store = JudgeCache(self.cache)
        try:
            scores = store.get_many(list(keys.values()))
            cached = len(scores)
            todo = _todo(keys, scores, rows, self.rubrics)
            scorer = self.scorer() if todo else None
            requests = _call(scorer, todo, store, scores, self.progress, label) if todo else 0
        finally:
            store.close()
        return scores, requests, cached


def make_judge(
    trait: Trait,
    settings: JudgeSettings = JudgeSettings(),
    *,
    progress: bool = True,
    model: ModelChoice | None = None,
    backend: Callable | None = None,
    scorer: Scorer | None = None,
) -> CachedJudge:
    """The judge of `trait`: settings.judge_model through an OpenAI-compatible API (base_url,
    default OpenAI's), or `local:MODEL` in-process with a pertoken backend (model.backend).

    model, backend: the model already chosen and a function returning its loaded backend; a
    `local:` judge of that same model reuses it. scorer: a ready ApiJudge or LocalJudge to use
    instead (base_url then defaults to its own). settings.cache: the sqlite score cache
    (default ~/.cache/pertoken/judge.sqlite); coherence_prompt: the coherence rubric (default:
    the kit's, else COHERENCE_PROMPT)."""
    model = model or ModelChoice("")
    s = replace(settings, base_url=settings.base_url or getattr(scorer, "base_url", None))
    same = backend if model.model and s.judge_model == f"local:{model.model}" else None
    make = (lambda: scorer) if scorer else functools.partial(_make_scorer, s, same, model.backend)
    return CachedJudge(trait, s, make, progress)


def _make_scorer(settings: JudgeSettings, backend, backend_name: str):
    """An ApiJudge, or a LocalJudge for `local:MODEL` (on `backend()` when given)."""
    s = settings
    if s.judge_model.startswith("local:"):
        from pertoken.pipeline.judge.local import LocalJudge

        if backend is None:
            return LocalJudge(
                ModelChoice(s.judge_model.removeprefix("local:"), backend_name).load()
            )
        return LocalJudge(backend())
    from pertoken.pipeline.judge.api import ApiJudge

    return ApiJudge(
        s.judge_model,
        base_url=s.base_url,
        concurrency=s.concurrency,
        max_consecutive_failures=s.max_failures,
    )


def _todo(keys, scores, rows, metrics) -> list[tuple[str, str]]:
    """Unique (cache key, filled rubric) pairs not in the cache."""
    todo: dict[str, str] = {}
    for (n, m), key in keys.items():
        if key not in scores and key not in todo:
            todo[key] = fill_rubric(metrics[m], rows[n]["question"], rows[n]["answer"])
    return list(todo.items())


def _call(scorer: Scorer, todo, store, scores, progress, label: str) -> int:
    """Run the scorer over `todo`; failures and retries show on the bar as they happen."""
    from tqdm import tqdm

    failed: dict[str, str] = {}
    retried: Counter = Counter()
    with tqdm(total=len(todo), unit="call", desc=label, disable=not progress) as bar:

        def show():
            parts = [f"{len(failed)} failed"] if failed else []
            parts += [f"{n} {what} retried" for what, n in sorted(retried.items())]
            bar.set_postfix_str(", ".join(parts), refresh=True)

        def done(key, score):
            store.put(key, score)
            scores[key] = score
            bar.update(1)

        def fail(key, reason):
            failed[key] = reason
            bar.update(1)
            show()

        def retry(what):
            retried[what] += 1
            show()

        before = scorer.requests
        scorer.run(todo, done, fail, on_retry=retry)
    if failed and len(failed) == len(todo):
        raise PertokenError(f"every judge call failed; the first: {next(iter(failed.values()))}")
    return scorer.requests - before
