"""Token roles, turns and segments, found in character space and mapped through token offsets.

A chat is rendered with the model's template; each message's content is located in the
rendered text (by rendering the same chat with markers in place of the contents), and inside
assistant text the spans between tag pairs (`<scratchpad>...</scratchpad>`) are named segments.
Each token takes the labels of the character it starts at, so a tag split over several tokens
still lands whole in its segment. Template text is segment `template`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pertoken.backends.chat import as_text
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.inputs import ROLES

BUILTIN = ("template", "prompt", "answer")


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    open: str
    close: str


DEFAULT_SEGMENTS = (
    SegmentSpec("scratchpad", "<scratchpad>", "</scratchpad>"),
    SegmentSpec("thinking", "<think>", "</think>"),
)


def parse_segment(text: str) -> SegmentSpec:
    """'NAME=OPEN,CLOSE' -> SegmentSpec."""
    name, sep, tags = text.partition("=")
    open_, comma, close = tags.partition(",")
    if not sep or not comma or not open_ or not close or not name.isidentifier():
        raise PertokenError(
            f"could not read --segment {text!r}: write NAME=OPEN,CLOSE, e.g. "
            "scratchpad=<scratchpad>,</scratchpad>"
        )
    if name in BUILTIN:
        raise PertokenError(f"--segment name {name!r} is taken: pick another than {BUILTIN}")
    return SegmentSpec(name, open_, close)


def segment_names(specs) -> list[str]:
    """Every segment a token can have: template, prompt, answer, then the tag spans."""
    return [*BUILTIN, *(s.name for s in specs)]


def tag_spans(text: str, specs, where: str, strict: bool = True) -> list[tuple[int, int, str]]:
    """(start, end, name) of each OPEN...CLOSE span in `text`, tags included, outer spans
    first (a span inside another is marked after it, so it keeps its own name).

    Tags of one kind nest by depth: a span runs from an opening tag to the close that matches
    it. strict (given text): an unclosed tag, a stray closing tag, or spans of two kinds that
    overlap without one holding the other are errors naming `where` and the character offset;
    otherwise (generated text, cut off by the token limit) an open span runs to the end, stray
    closes are ignored and overlaps are kept."""
    spans = [span for spec in specs for span in _spans_of(text, spec, where, strict)]
    spans.sort(key=lambda s: (s[0], -s[1]))
    if strict:
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0 < e1:
                raise PertokenError(
                    f"{where}: the {n1} span at character {s1} starts inside the {n0} span "
                    f"at character {s0} and ends after it: close one before the other ends"
                )
    return spans


def _spans_of(text: str, spec: SegmentSpec, where: str, strict: bool) -> list[tuple]:
    """The outermost OPEN...CLOSE spans of one tag pair, by nesting depth."""
    spans, at, depth, start = [], 0, 0, 0
    while True:
        o, c = text.find(spec.open, at), text.find(spec.close, at)
        if o < 0 and c < 0:
            break
        if c >= 0 and (o < 0 or c < o or (c == o and depth > 0)):  # a close comes first
            at = c + len(spec.close)
            if depth == 0:
                if strict:
                    raise PertokenError(
                        f"{where}: {spec.close} at character {c} closes no {spec.open}: "
                        "remove it, or pass --segment to name other tags"
                    )
                continue
            depth -= 1
            if depth == 0:
                spans.append((start, at, spec.name))
        else:
            start = o if depth == 0 else start
            depth, at = depth + 1, o + len(spec.open)
    if depth > 0:
        if strict:
            raise PertokenError(
                f"{where}: {spec.open} is never closed by {spec.close} (it opens at character "
                f"{start}): close it, or pass --segment to name other tags"
            )
        spans.append((start, len(text), spec.name))
    return spans


@dataclass
class TokenLabels:
    """Token ids, text pieces and labels of one transcript."""

    ids: list[int]
    pieces: list[str]  # each token's share of the text; joined they give the text
    turn: np.ndarray  # [T] int32: message index (CSV: 0 prompt, 1 answer)
    role: list[str]  # [T] system | user | assistant
    segment: list[str]  # [T] template | prompt | answer | a tag span's name
    prompt_len: int  # tokens before the first answer token (prompt_last = prompt_len - 1)


class _Chars:
    """Per-character labels, filled by ranges and read at each token's first character."""

    def __init__(self, n: int, names: list[str]):
        self.names = names
        self.turn = np.zeros(n, np.int32)
        self.role = np.zeros(n, np.int8)
        self.segment = np.zeros(n, np.int8)  # index into names; 0 = template

    def mark(self, start: int, end: int, **labels) -> None:
        for key, value in labels.items():
            if key == "segment":
                value = self.names.index(value)
            elif key == "role":
                value = ROLES.index(value)
            getattr(self, key)[start:end] = value

    def tokens(self, ids, spans, text: str, prompt_len: int) -> TokenLabels:
        starts = np.array([min(s, max(len(text) - 1, 0)) for s, _ in spans], dtype=np.int64)
        cuts = [0, *(s for s, _ in spans[1:]), len(text)]
        pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        return TokenLabels(
            ids=list(ids),
            pieces=pieces,
            turn=self.turn[starts],
            role=[ROLES[i] for i in self.role[starts]],
            segment=[self.names[i] for i in self.segment[starts]],
            prompt_len=prompt_len,
        )


def label_pair(backend, prompt: str, answer: str, specs, where: str, strict=True) -> TokenLabels:
    """A templated prompt and its answer: `prompt` tokens (turn 0, user), then `answer`
    tokens (turn 1, assistant) with tag spans; the prompt is len(encode(prompt)) tokens."""
    text = prompt + answer
    if not getattr(backend, "special_tokens_in_content", False):  # the answer is text
        text = as_text(text, [(len(prompt), len(text))])
    ids, spans = backend.encode_offsets(text)
    P = len(backend.encode(prompt))
    chars = _Chars(len(text), segment_names(specs))
    chars.mark(0, len(text), turn=1, role="assistant", segment="answer")
    for s, e, name in tag_spans(answer, specs, where, strict):
        chars.mark(len(prompt) + s, len(prompt) + e, segment=name)
    labels = chars.tokens(ids, spans, text, P)
    for i in range(min(P, len(ids))):  # the prompt ends where its own tokenization ends
        labels.turn[i], labels.role[i], labels.segment[i] = 0, "user", "prompt"
    return labels


def label_chat(backend, messages: list[dict], specs, where: str) -> TokenLabels:
    """A chat through the template: content tokens get their message's turn and role
    (`prompt` for system/user text, `answer` or a tag span for assistant text), template tokens
    the turn of the message they frame. Without a final assistant message the generation prompt
    is added, as an assistant turn of template tokens."""
    gen = messages[-1]["role"] != "assistant"
    text = backend.chat_text(messages, add_generation_prompt=gen)
    layout = _layout(backend, tuple(m["role"] for m in messages), gen)
    starts = _content_starts(text, messages, layout, where)
    chars = _Chars(len(text), segment_names(specs))
    bounds = [*(layout.region_start(k, starts) for k in range(len(messages))), len(text)]
    answer_at = len(text)
    for k, m in enumerate(messages):
        chars.mark(bounds[k], bounds[k + 1], turn=k, role=m["role"])
        begin, content = starts[k]
        chars.mark(begin, begin + len(content), segment="prompt")
        if m["role"] == "assistant":
            answer_at = min(answer_at, begin)
            chars.mark(begin, begin + len(content), segment="answer")
            for s, e, name in tag_spans(content, specs, f"{where}, message {k + 1}"):
                chars.mark(begin + s, begin + e, segment=name)
    if gen:
        tail = layout.gen_start(starts, text)
        chars.mark(tail, len(text), turn=len(messages), role="assistant", segment="template")
    ids, spans = backend.encode_offsets(text)
    prompt_len = sum(1 for s, _ in spans if s < answer_at)
    return chars.tokens(ids, spans, text, prompt_len)


def _marker(k: int) -> str:
    return f"\u27e6pertoken-message-{k}\u27e7"


@dataclass
class _Layout:
    """The template's text around each message, from a render with markers as contents."""

    gaps: list[str]  # template text before message 0, between messages, after the last
    cuts: list[int]  # where message k's region starts inside gaps[k] (its header)
    gen_cut: int  # where the generation prompt starts inside the last gap

    def region_start(self, k: int, starts) -> int:
        if k == 0:
            return 0
        begin, content = starts[k - 1]
        return begin + len(content) + self.cuts[k]

    def gen_start(self, starts, text: str) -> int:
        begin, content = starts[-1]
        return begin + len(content) + self.gen_cut


@functools.lru_cache(maxsize=256)
def _layout(backend, roles: tuple[str, ...], gen: bool) -> _Layout:
    """The layout of one sequence of roles (the same for every chat with those roles)."""
    msgs = [{"role": r, "content": _marker(k)} for k, r in enumerate(roles)]
    skeleton = backend.chat_text(msgs, add_generation_prompt=gen)
    gaps, rest = [], skeleton
    for k in range(len(roles)):
        before, sep, rest = rest.partition(_marker(k))
        if not sep:
            raise PertokenError(
                "this model's chat template drops or reorders message text, so token roles "
                "cannot be found: trace a CSV of prompt and answer instead"
            )
        gaps.append(before)
    gaps.append(rest)
    # Message k's region starts where the render of the first k messages ends (its end-of-turn
    # tokens stay with message k-1); when that is not a prefix, at the end of message k-1.
    cuts = [0] + [_cut(backend, msgs[:k], skeleton, gaps, k) for k in range(1, len(roles))]
    gen_cut = _cut(backend, msgs, skeleton, gaps, len(roles)) if gen else len(gaps[-1])
    return _Layout(gaps, cuts, gen_cut)


def _cut(backend, msgs, skeleton: str, gaps: list[str], k: int) -> int:
    try:
        prefix = backend.chat_text(msgs, add_generation_prompt=False)
    except Exception:  # some templates refuse a chat that ends early (e.g. on a system turn)
        return 0
    gap_start = len(prefix.rpartition(_marker(k - 1))[0]) + len(_marker(k - 1))
    if not skeleton.startswith(prefix) or gap_start > len(prefix):
        return 0
    return min(len(prefix) - gap_start, len(gaps[k]))


def _content_starts(text: str, messages, layout: _Layout, where: str) -> list[tuple[int, str]]:
    """(start in `text`, content as rendered) per message: the contents as given, or stripped
    (templates such as Gemma's trim them)."""
    for shape in (lambda c: c, str.strip):
        contents = [shape(m["content"]) for m in messages]
        parts = [layout.gaps[0]]
        for c, gap in zip(contents, layout.gaps[1:]):
            parts += [c, gap]
        if "".join(parts) == text:
            starts, at = [], len(layout.gaps[0])
            for c, gap in zip(contents, layout.gaps[1:]):
                starts.append((at, c))
                at += len(c) + len(gap)
            return starts
    raise PertokenError(
        f"{where}: the chat template rewrites the messages' text, so their tokens cannot be "
        "located: trace a CSV of the templated prompt and answer instead"
    )
