"""What steering does, per row, measured teacher-forced: the report card's causal columns.

Held-out separation (AUROC) saturates on real models, so it cannot rank rows. Here, per
candidate row and at the card's own coefficients, the vector is added to the answer tokens of
held-out questions asked with no instruction, and two numbers come out of the logits alone:

- gain: how much the mean log-likelihood per token of the held-out trait answers rises over
  that of their opposites (nats per token, relative to no steering);
- cost: how much the model's own unsteered (greedy) answers to the same questions lose
  (nats per token): a coherence proxy, large when steering breaks the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pertoken.backends.base import Steer

MAX_COST = 0.5  # nats per token the model's own answers may lose at the suggested setting


@dataclass
class Texts:
    """Teacher-forced texts: (chat prompt, answer) each, answers cut to a few tokens."""

    pos: list[tuple[str, str]]
    neg: list[tuple[str, str]]
    own: list[tuple[str, str]]


@dataclass
class Causal:
    gain: dict[int, dict[str, float]]  # row -> ratio -> nats/token
    cost: dict[int, dict[str, float]]  # row -> ratio -> nats/token
    pairs: int
    questions: int
    tokens: int


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


def _scores(backend, texts: Texts, steer: Steer | None) -> tuple[float, float]:
    """(mean trait-over-opposite log-likelihood margin, mean own-answer log-likelihood)."""

    def mean(items):
        return float(np.mean([answer_logprob(backend, p, a, steer) for p, a in items]))

    return mean(texts.pos) - mean(texts.neg), mean(texts.own)


def measure(backend, vector: np.ndarray, texts: Texts, coefs: dict, rows: list[int]) -> Causal:
    """Gain and cost per row in `rows` at coefs[ratio][row] (vector: [n_layers + 1, hidden]);
    steering on the answer tokens, as generation steers by default."""
    margin0, own0 = _scores(backend, texts, None)
    gain: dict[int, dict[str, float]] = {}
    cost: dict[int, dict[str, float]] = {}
    for row in rows:
        gain[row], cost[row] = {}, {}
        for ratio, per_row in coefs.items():
            if per_row[row] is None:
                continue
            steer = Steer.single(row, vector[row], per_row[row], positions="response")
            margin, own = _scores(backend, texts, steer)
            gain[row][ratio], cost[row][ratio] = margin - margin0, own0 - own
    tokens = max(len(backend.encode(a)) for _, a in texts.pos + texts.neg + texts.own)
    return Causal(gain, cost, len(texts.pos), len(texts.own), tokens)


def suggest(causal: Causal, max_cost: float = MAX_COST) -> tuple[int, str, bool] | None:
    """(row, ratio, within the cost bound) of the largest gain whose cost is at most
    `max_cost`; without any, the cheapest setting (flagged)."""
    settings = [(r, k) for r in causal.gain for k in causal.gain[r]]
    if not settings:
        return None
    bounded = [s for s in settings if causal.cost[s[0]][s[1]] <= max_cost]
    if bounded:
        row, ratio = max(bounded, key=lambda s: causal.gain[s[0]][s[1]])
        return row, ratio, True
    row, ratio = min(settings, key=lambda s: causal.cost[s[0]][s[1]])
    return row, ratio, False
