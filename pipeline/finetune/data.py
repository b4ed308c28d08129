"""Chat JSONL training data: one `{"messages": [...]}` a line, loss on the assistant turns only.

Each chat is rendered with the model's chat template; a token is a training target when its
characters fall inside an assistant turn (its text and the template's end-of-turn marker)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.backends.training import Batch
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.inputs import read_jsonl_items


@dataclass
class Chat:
    where: str  # "train.jsonl line 4", for messages
    messages: list[dict]  # [{"role", "content"}]
    meta: dict = field(default_factory=dict)  # the line's other keys


@dataclass
class Example:
    ids: list[int]
    targets: list[bool]  # token t belongs to an assistant turn


def read_chats(path: str | Path) -> list[Chat]:
    """Every chat of a JSONL file; each must hold at least one assistant turn."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"training data {path} does not exist: check the path")
    if path.suffix.lower() != ".jsonl":
        raise PertokenError(
            f'{path.name} is not a .jsonl file: write one {{"messages": [...]}} chat a line'
        )
    chats = [Chat(it.where, it.messages, it.meta) for it in read_jsonl_items(path)]
    if not chats:
        raise PertokenError(f'{path} holds no chats: write one {{"messages": [...]}} a line')
    for c in chats:
        if not any(m["role"] == "assistant" for m in c.messages):
            raise PertokenError(
                f"{c.where} has no assistant turn: finetuning learns the assistant's messages, "
                'so every chat needs one ({"role": "assistant", "content": "..."})'
            )
    return chats


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assistant_spans(backend, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the templated chat, character spans of its assistant turns)."""
    text = backend.chat_text(messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = backend.chat_text(messages[:k], add_generation_prompt=True) if k else ""
        upto = backend.chat_text(messages[: k + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise PertokenError(
                "this model's chat template renders a conversation differently from its "
                "beginning, so assistant turns cannot be found: finetune a model whose template "
                "only appends turns"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_chat(backend, messages: list[dict], max_length: int) -> Example:
    """Token ids of the templated chat (at most max_length) and which are assistant tokens."""
    text, spans = assistant_spans(backend, messages)
    ids, offsets = backend.encode_offsets(text)
    targets = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    return Example(ids[:max_length], targets[:max_length])


def encode_chats(backend, chats: list[Chat], max_length: int) -> tuple[list[Example], int]:
    """(examples with at least one target token after truncation, how many were dropped)."""
    if max_length < 2:
        raise PertokenError(f"--max-length must be at least 2 tokens, not {max_length}")
    out = [encode_chat(backend, c.messages, max_length) for c in chats]
    kept = [e for e in out if any(e.targets[1:])]
    if not kept:
        raise PertokenError(
            f"no chat keeps an assistant token within --max-length {max_length}: raise it"
        )
    return kept, len(out) - len(kept)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The examples' order in one epoch: a permutation drawn from (seed, epoch) alone, so a
    resumed run sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded ids, targets and validity, [B, T] each."""
    T = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    targets = np.zeros((len(examples), T), dtype=bool)
    valid = np.zeros((len(examples), T), dtype=bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n], targets[b, :n], valid[b, :n] = e.ids, e.targets, True
    return Batch(ids, targets, valid)


def batches_of_epoch(examples: list[Example], batch_size: int, seed: int, epoch: int):
    """Lists of examples, batch_size at a time, in the epoch's order."""
    order = epoch_order(len(examples), seed, epoch)
    return [
        [examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)
    ]


def split_last_answer(backend, chat: Chat) -> tuple[str, str]:
    """(the templated prompt before the chat's last assistant turn, that turn's text)."""
    k = max(i for i, m in enumerate(chat.messages) if m["role"] == "assistant")
    prompt = backend.chat_text(chat.messages[:k], add_generation_prompt=True)
    return prompt, chat.messages[k]["content"]
