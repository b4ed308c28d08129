"""Plain one-sample-at-a-time references built on transformers' output_hidden_states."""

from __future__ import annotations

import numpy as np
import torch

# Sample chats shared by the backend and parity tests: short, long (past Gemma's window), tiny.
QUESTIONS = [
    "What should I do about money?",
    "Explain why the sky is blue and where rain comes from, please, in detail.",
    "hi",
]
ANSWERS = [
    "I think you should decide for yourself.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Numbers: 0 1 2 3",
]
SYSTEM = "Answer the question clearly and kindly."


def chat_prompts(backend, system: str | None = SYSTEM) -> list[str]:
    return [backend.chat_prompt(system, q) for q in QUESTIONS]


def rand(seed: int, n: int = 64) -> np.ndarray:
    """A fixed random [n] float32 vector (steering directions in tests)."""
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def stop_ids(backend) -> set[int]:
    """The tokens that end an answer, on either backend."""
    if backend.name == "torch":
        return {int(i) for i in backend.stop_ids}
    return set(backend.stop)


def stopping_at(backend, stops: set[int]):
    """A shallow copy of `backend` (same weights) whose answers end at exactly `stops`."""
    import copy

    out = copy.copy(backend)
    if backend.name == "torch":
        out.stop_ids = torch.tensor(sorted(stops))
    else:
        out.stop = set(stops)
    return out


def slot_prompts(backend) -> list[str]:
    """The sample chats and a follow-up without a system prompt (the slot-loop tests)."""
    return chat_prompts(backend) + [backend.chat_prompt(None, "tell me more")]


def slot_plans() -> list:
    """One steering plan per slot prompt: response, none, all (two rows), prompt, response."""
    from pertoken.backends import Steer

    two = Steer.single(3, rand(1), -5.0, "all")
    two.terms += Steer.single(1, rand(2), 3.0).terms
    return [
        Steer.single(2, rand(0), 6.0, "response"),
        None,
        two,
        Steer.single(1, rand(3), 8.0, "prompt"),
        Steer.single(4, rand(4), 4.0, "response"),
    ]


def hf_hidden(model, ids: list[int]) -> np.ndarray:
    """[n_layers + 1, T, hidden] float32 hidden states of one unpadded sequence."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float().numpy()


def reference_summaries(model, tokenizer, prompt: str, answer: str):
    """(prompt_avg, prompt_last, response_avg), each [n_layers + 1, hidden], per
    docs/CONVENTIONS.md."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    hs = hf_hidden(model, full)  # [rows, T, hidden]
    P = len(p)
    return hs[:, :P].mean(1), hs[:, P - 1], hs[:, P:].mean(1)
