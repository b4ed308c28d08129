"""What steering does, per row, measured teacher-forced: the report card's causal columns.

Held-out separation (AUROC) saturates on real models, so it cannot rank rows. Here, per
candidate row and at the card's own coefficients, the vector is added to the answer tokens of
held-out questions asked with no instruction, and two numbers come out of the logits alone:

- gain: how much the mean log-likelihood per token of the held-out trait answers rises over
  that of their opposites (nats per token, relative to no steering);
- cost: how much the model's own unsteered (greedy) answers to the same questions lose
  (nats per token). For a trait that changes the whole answer (a language) those answers are
  the trait's opposite, so this cost rises with the gain and cannot tell breakage from success;
- trait_cost: how much the held-out trait answers themselves lose (nats per token). Moving
  towards the trait should not make real trait answers less likely, so a loss there is damage,
  not the trait: the coherence proxy the suggestion is bounded by.

Teacher forcing keeps the model on the forced tokens, so it does not see the loops ("la la la")
free generation falls into. `free_run` answers the held-out questions greedily at every
candidate setting in one generate call, steering LOOP_MARGIN times harder than the setting, and
keeps the share of distinct token trigrams: a setting passes when even that harder push keeps
at least LOOP_SHARE of the unsteered answers' share, a margin below where loops start rather
than the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pertoken.backends.base import Steer

MAX_COST = 0.5  # nats per token the trait answers may lose at the suggested setting
LOOP_MARGIN = 1.25  # the loop check steers this much harder than the setting it vets
# a loop: over half of what would be new text is repetition. Relative to the unsteered answers,
# since prose repeats some trigrams too (0.7-1.0 at 64 tokens) and a tokenizer made for one
# language cuts another into more repetitive pieces
LOOP_SHARE = 0.5
MIN_ANSWERS = 8  # judged answers per setting (vet --judged): 3 left the verdict to chance
NGRAM = 3  # trigrams: ordinary prose repeats few, a loop of period p over n tokens ~ p / n


@dataclass
class Texts:
    """Teacher-forced texts: (chat prompt, answer) each, answers cut to a few tokens."""

    pos: list[tuple[str, str]]
    neg: list[tuple[str, str]]
    own: list[tuple[str, str]]


@dataclass
class Causal:
    gain: dict[int, dict[str, float]]  # row -> ratio -> nats/token
    cost: dict[int, dict[str, float]]  # row -> ratio -> nats/token, own answers
    pairs: int
    questions: int
    tokens: int
    trait_cost: dict[int, dict[str, float]] | None = None  # row -> ratio -> nats/token
    distinct: dict[int, dict[str, float]] | None = None  # row -> ratio -> share, free_run
    distinct0: float | None = None  # the unsteered greedy answers' distinct share


def candidate_rows(n_layers: int) -> list[int]:
    """Every row but the first two (embeddings, first block) and the last (after the norm)."""
    return list(range(2, n_layers)) or list(range(1, n_layers + 1))


def held_out_texts(backend, pairs, held_out: set[int], *, max_pairs=4, max_tokens=32) -> Texts:
    """Held-out pairs under the bare question (no system prompt), and the model's own greedy
    answers to those questions (one generate call)."""
    held = [b for b, key in enumerate(pairs.keys) if key[0] in held_out]
    # (instruction, sample, question) order: the first pairs come from different questions
    keep = sorted(held, key=lambda b: (*pairs.keys[b][1:], pairs.keys[b][0]))[:max_pairs]
    questions = list(dict.fromkeys(pairs.pos[b]["question"] for b in keep))
    prompts = {q: backend.chat_prompt(None, q) for q in questions}
    own = backend.generate(list(prompts.values()), max_new_tokens=max_tokens, temperature=0.0)

    def cut(rows):
        return [(prompts[r["question"]], _cut(backend, r["answer"], max_tokens)) for r in rows]

    return Texts(
        pos=cut(pairs.pos[b] for b in keep),
        neg=cut(pairs.neg[b] for b in keep),
        own=list(zip(prompts.values(), own)),
    )


def check_questions(pairs, held_out: set[int]) -> list[str]:
    """The questions the judged check asks with no instruction: the held-out ones, then
    training ones (their instructed answers made the vector, not their bare ones) up to
    MIN_ANSWERS."""
    held = [r["question"] for r, k in zip(pairs.pos, pairs.keys) if k[0] in held_out]
    rest = [r["question"] for r, k in zip(pairs.pos, pairs.keys) if k[0] not in held_out]
    held, rest = list(dict.fromkeys(held)), list(dict.fromkeys(rest))
    return held + rest[: max(0, MIN_ANSWERS - len(held))]


def _cut(backend, answer: str, n: int) -> str:
    ids = backend.encode(answer)
    return answer if len(ids) <= n else backend.decode(ids[:n])


def answer_logprob(backend, prompt: str, answer: str, steer: Steer | None) -> float:
    """Mean log-probability per answer token, the answer teacher-forced after the prompt."""
    n_prompt = len(backend.encode(prompt))
    ids = backend.encode(prompt + answer)
    logits = np.asarray(backend.logits(prompt + answer, steer=steer, prompt_len=n_prompt))
    logits = logits.astype(np.float64)  # [T, vocab]
    top = logits.max(axis=-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    steps = range(n_prompt - 1, len(ids) - 1)  # the logits at t predict token t + 1
    return float(np.mean([logp[t, ids[t + 1]] for t in steps])) if len(steps) else 0.0


def _scores(backend, texts: Texts, steer: Steer | None) -> tuple[float, float, float]:
    """Mean log-likelihood per token of the (trait, opposite, own) answers."""

    def mean(items):
        return float(np.mean([answer_logprob(backend, p, a, steer) for p, a in items]))

    return mean(texts.pos), mean(texts.neg), mean(texts.own)


def measure(backend, vector: np.ndarray, texts: Texts, coefs: dict, rows: list[int]) -> Causal:
    """Gain, cost and trait cost per row in `rows` at coefs[ratio][row] (vector:
    [n_layers + 1, hidden]); steering on the answer tokens, as generation steers by default."""
    pos0, neg0, own0 = _scores(backend, texts, None)
    gain: dict[int, dict[str, float]] = {}
    cost: dict[int, dict[str, float]] = {}
    trait_cost: dict[int, dict[str, float]] = {}
    for row in rows:
        gain[row], cost[row], trait_cost[row] = {}, {}, {}
        for ratio, per_row in coefs.items():
            if per_row[row] is None:
                continue
            steer = Steer.single(row, vector[row], per_row[row], positions="response")
            pos, neg, own = _scores(backend, texts, steer)
            gain[row][ratio] = (pos - neg) - (pos0 - neg0)
            cost[row][ratio], trait_cost[row][ratio] = own0 - own, pos0 - pos
    tokens = max(len(backend.encode(a)) for _, a in texts.pos + texts.neg + texts.own)
    return Causal(gain, cost, len(texts.pos), len(texts.own), tokens, trait_cost)


def distinct_share(ids: list[int], n: int = NGRAM) -> float:
    """Share of distinct n-grams of a token sequence; 0 for one too short to hold any."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def free_run(backend, vector, causal: Causal, coefs: dict, prompts: list[str], *,
             max_cost: float = MAX_COST, max_tokens: int = 32) -> None:  # fmt: skip
    """Fill causal.distinct: per setting of positive gain within the trait-cost bound, the mean
    distinct share of greedy answers to `prompts` steered at LOOP_MARGIN x its coefficient,
    beside the unsteered answers (causal.distinct0), all in one generate call."""
    settings = [(r, k) for r, k in _settings(causal) if _bounded(causal, r, k, max_cost)]
    grid = [(s, p) for s in [None, *settings] for p in prompts]
    steers = [
        None if s is None
        else Steer.single(s[0], vector[s[0]], LOOP_MARGIN * coefs[s[1]][s[0]], positions="response")
        for s, _ in grid
    ]  # fmt: skip
    answers = backend.generate(
        [p for _, p in grid], max_new_tokens=max_tokens, temperature=0.0, steer=steers
    )
    shares = [distinct_share(backend.encode(a)) for a in answers]
    n = len(prompts)
    means = [float(np.mean(shares[i * n : (i + 1) * n])) for i in range(len(settings) + 1)]
    causal.distinct0, causal.distinct = means[0], {}
    for (r, k), m in zip(settings, means[1:]):
        causal.distinct.setdefault(r, {})[k] = m


def _settings(causal: Causal) -> list[tuple[int, str]]:
    return [(r, k) for r in causal.gain for k in causal.gain[r]]


def _bounded(causal: Causal, row: int, ratio: str, max_cost: float) -> bool:
    """Positive gain at a trait cost of at most max_cost (the own-answer cost without one)."""
    cost = causal.trait_cost if causal.trait_cost is not None else causal.cost
    return causal.gain[row][ratio] > 0 and cost[row][ratio] <= max_cost


def sound(causal: Causal, row: int, ratio: str, max_cost: float = MAX_COST) -> bool:
    """Within the trait-cost bound and, where the loop check ran, not looping."""
    if not _bounded(causal, row, ratio, max_cost):
        return False
    if causal.distinct is None:
        return True
    return causal.distinct.get(row, {}).get(ratio, 0.0) >= min_distinct(causal)


def min_distinct(causal: Causal) -> float:
    """The distinct share a setting's loop check must keep: LOOP_SHARE of the unsteered one."""
    return LOOP_SHARE * (causal.distinct0 if causal.distinct0 is not None else 1.0)


def suggest(causal: Causal, max_cost: float = MAX_COST) -> tuple[int, str, bool] | None:
    """(row, ratio, sound) of the largest gain among the sound settings (see `sound`); without
    any, the setting of least trait cost (flagged)."""
    settings = _settings(causal)
    if not settings:
        return None
    ok = [s for s in settings if sound(causal, *s, max_cost)]
    if ok:
        row, ratio = max(ok, key=lambda s: causal.gain[s[0]][s[1]])
        return row, ratio, True
    cost = causal.trait_cost if causal.trait_cost is not None else causal.cost
    row, ratio = min(settings, key=lambda s: cost[s[0]][s[1]])
    return row, ratio, False
