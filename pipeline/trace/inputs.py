"""Inputs of `pertoken trace`, by extension: CSV (prompt + answer), JSONL chats, prompt lists.

Every input becomes a list of Items: a chat (JSONL, OpenAI `messages`), a templated prompt with
its answer (CSV), or a user prompt whose answer is still to be generated (.txt / JSON list).
Bad input is one PertokenError naming the file, the line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import read_table, utf8_text

ROLES = ("system", "user", "assistant")
RESERVED = ("item", "n_tokens", "input_sha256")


@dataclass
class Item:
    """One transcript to trace; exactly one of `messages`, `prompt` or `user` is set."""

    index: int  # position in the input, 0-based: the store's `item`
    where: str  # for errors: "chats.jsonl line 4"
    meta: dict = field(default_factory=dict)  # metadata columns (scores, extra keys)
    messages: list[dict] | None = None  # a chat: [{"role", "content"}]
    prompt: str | None = None  # chat-templated prompt (CSV)
    answer: str | None = None  # the answer to `prompt` (CSV, or generated)
    user: str | None = None  # a user message whose answer is generated (needs `question`)
    question: str | None = None  # CSV without `prompt`: template this question, no system

    @property
    def sha256(self) -> str:
        """A short hash of the transcript's input, to tell a changed input on resume."""
        data = [self.messages, self.prompt, self.answer, self.user, self.question]
        text = json.dumps(data, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_items(path: str | Path) -> list[Item]:
    """Items of a `.csv`, `.jsonl`, `.txt` or `.json` file (format by extension)."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"input file {path} does not exist: check the path")
    readers = {".csv": read_csv_items, ".jsonl": read_jsonl_items}
    reader = readers.get(path.suffix.lower())
    if reader is None and path.suffix.lower() in (".txt", ".json"):
        reader = read_prompt_items
    if reader is None:
        raise PertokenError(
            f"{path.name}: unknown input type {path.suffix or '(none)'}: give a .csv (prompt, "
            "answer), .jsonl (one chat per line), .txt (one prompt a line) or .json list"
        )
    items = reader(path)
    for it in items:  # a key named like one of the store's own columns keeps a prefix
        it.meta = {(f"meta.{k}" if k in RESERVED else k): v for k, v in it.meta.items()}
    if not items:
        raise PertokenError(f"{path} holds nothing to trace")
    return items


def read_csv_items(path: Path) -> list[Item]:
    """Rows with `answer` and `prompt` (or `question`, templated without a system prompt)."""
    header, rows = read_table(path)
    if "answer" not in header or not {"prompt", "question"} & set(header):
        missing = "answer" if "answer" not in header else "prompt"
        raise PertokenError(
            f"{path.name} has no {missing} column: pass a generation or eval CSV with "
            "prompt (or question) and answer columns"
        )
    keep = [c for c in header if c not in ("prompt", "answer")]
    types = {c: _column_type([r.get(c) for r in rows]) for c in keep}
    items = []
    for i, r in enumerate(rows):
        where = f"{path.name} row {i + 2}"
        meta = {c: _typed(r.get(c), types[c]) for c in keep}
        if "prompt" in header:
            items.append(Item(i, where, meta, prompt=r["prompt"], answer=r["answer"]))
        else:
            items.append(Item(i, where, meta, question=r["question"], answer=r["answer"]))
    return items


def read_jsonl_items(path: Path) -> list[Item]:
    """One `{"messages": [...], ...}` chat per line; other keys become metadata."""
    items = []
    for n, line in enumerate(utf8_text(path, "JSONL").split("\n"), start=1):
        if line.strip():
            items.append(_chat_item(len(items), f"{path.name} line {n}", line))
    return _typed_meta(items)


def _chat_item(index: int, where: str, line: str) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        msg = f"{where} is not JSON ({e.msg}): write one chat object a line"
        raise PertokenError(msg) from None
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise PertokenError(
            f'{where} has no "messages" list: write each line as {{"messages": [{{"role": '
            '"user", "content": "..."}, ...]}'
        )
    messages = [_message(where, k, m) for k, m in enumerate(msgs, start=1)]
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return Item(index, where, meta, messages=messages)


def _message(where: str, k: int, m) -> dict:
    if not isinstance(m, dict) or "role" not in m:
        raise PertokenError(f'{where}, message {k} is not a {{"role", "content"}} object')
    if m["role"] not in ROLES:
        raise PertokenError(
            f"{where}, message {k} has role {m['role']!r}: roles must be one of {', '.join(ROLES)}"
        )
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise PertokenError(f"{where}, message {k} has no text content")
    return {"role": m["role"], "content": content}


def read_prompt_items(path: Path) -> list[Item]:
    """User prompts (one a line, or a JSON list of strings) whose answers are generated."""
    return [
        Item(i, f"{path.name} prompt {i + 1}", {"question": p}, user=p)
        for i, p in enumerate(read_prompts(path))
    ]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"prompts file {path} does not exist: check the path")
    text = utf8_text(path, "prompts file")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PertokenError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            kind = "a JSON object" if isinstance(items, dict) else "not a list of strings"
            raise PertokenError(
                f"{path} is {kind}: give a JSON list of prompt strings (or chats as .jsonl, "
                'one {"messages": [...]} a line)'
            )
        prompts = [x for x in items if x.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PertokenError(f"{path} holds no prompts: write one per line or a JSON list")
    return prompts


def _typed_meta(items: list[Item]) -> list[Item]:
    """One type per metadata key across items: numbers, text, or JSON text for anything else."""
    for k in dict.fromkeys(k for it in items for k in it.meta):
        values = [it.meta.get(k) for it in items if it.meta.get(k) is not None]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            kind = "float"
        else:
            kind = "string" if all(isinstance(v, str) for v in values) else "json"
        for it in items:
            v = it.meta.get(k)
            if v is not None and kind != "string":
                v = float(v) if kind == "float" else json.dumps(v, ensure_ascii=False)
            it.meta[k] = v
    return items


def _column_type(values: list) -> str:
    """`float` when every non-empty CSV value is a number, else `string`."""
    filled = [v for v in values if v not in (None, "")]
    return "float" if filled and all(_number(v) is not None for v in filled) else "string"


def _typed(value, kind: str):
    if kind == "float":
        x = _number(value)
        return None if x is None or math.isnan(x) else x
    return value


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def meta_types(items: list[Item]) -> dict[str, str]:
    """Column -> `float` | `string` for the items' metadata (all-empty columns are float)."""
    types: dict[str, str | None] = {}
    for it in items:
        for k, v in it.meta.items():
            if types.get(k) is None:
                types[k] = None if v is None else ("float" if isinstance(v, float) else "string")
    return {k: t or "float" for k, t in types.items()}
