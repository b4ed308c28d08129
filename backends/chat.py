"""Chat templates, stop tokens and offsets on a Hugging Face tokenizer (both backends)."""

from __future__ import annotations

import functools
import itertools
import re

END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")


def render_chat(tokenizer, system: str | None, user: str) -> str:
    """The chat-templated prompt with the generation prompt; system text is merged into the user
    turn ("{system}\\n\\n{user}") when the template has no system role (Gemma 2)."""
    if system and _has_system_role(tokenizer):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    else:
        text = f"{system}\n\n{user}" if system else user
        messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _has_system_role(tokenizer) -> bool:
    marker = "pertoken-system-probe"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates without a system role raise (Gemma's does)
        return False
    return marker in rendered


def stop_token_ids(tokenizer, config=None, generation_config=None) -> list[int]:
    """EOS ids from the config, generation config and tokenizer, plus end-of-turn tokens."""
    ids: set[int] = set()
    for source in (config, generation_config, tokenizer):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def render_messages(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """A whole conversation through the chat template; without a system role each system
    message is merged into the next user message ("{system}\\n\\n{user}"), as render_chat does."""
    if not _has_system_role(tokenizer):
        messages = _merge_system(messages)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _merge_system(messages: list[dict]) -> list[dict]:
    out, pending = [], []
    for m in messages:
        if m["role"] == "system":
            pending.append(m["content"])
        elif pending and m["role"] == "user":
            out.append({**m, "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out += [{"role": "user", "content": "\n\n".join(pending)}] if pending else []
            out.append(m)
            pending = []
    return out + ([{"role": "user", "content": "\n\n".join(pending)}] if pending else [])


class Templated(str):
    """A chat-templated text that knows the character spans of its messages' contents: the
    special-token text inside them (`<|eot_id|>` typed by a user) is encoded as plain text,
    as chat servers do, while the template's own special tokens stay special."""

    content: tuple[tuple[int, int], ...] = ()


def as_text(text: str, spans: list[tuple[int, int]]) -> Templated:
    out = Templated(text)
    out.content = tuple(spans)
    return out


@functools.lru_cache(maxsize=16)  # per tokenizer object (they hash by identity)
def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any of the tokenizer's special tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    names |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    if not names:
        return None
    return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))


def content_spans(tokenizer, messages: list[dict], text: str, gen: bool) -> list[tuple[int, int]]:
    """Where each message's content sits in `text` (its render): the template rendered with
    markers for contents gives the text between them; the contents fill the gaps, as given or
    stripped (templates such as Gemma's trim them)."""
    markers = [f"\u27e6pertoken-content-{k}\u27e7" for k in range(len(messages))]
    skeleton = render_messages(
        tokenizer,
        [{**m, "content": mk} for m, mk in zip(messages, markers)],
        add_generation_prompt=gen,
    )
    gaps, rest = [], skeleton
    for mk in markers:
        before, found, rest = rest.partition(mk)
        gaps.append(before)
    for shape in (lambda c: c, str.strip):
        contents = [shape(m["content"]) for m in messages]
        if found and "".join(g + c for g, c in zip(gaps, contents)) + rest == text:
            starts = itertools.accumulate(len(g) + len(c) for g, c in zip(gaps, contents))
            return [(end - len(c), end) for end, c in zip(starts, contents)]
    from pertoken.errors import PertokenError

    raise PertokenError(
        "a message holds special-token text, and this model's chat template rewrites message "
        "text, so that text cannot be kept apart from the template's tokens: remove it"
    )


def _pieces(text: str, pattern) -> list[tuple[str, bool]]:
    """`text` cut at the content spans that hold special-token text: (piece, as plain text)."""
    content = getattr(text, "content", ()) if pattern is not None else ()
    spans = [(a, b) for a, b in content if pattern.search(text, a, b)]
    pieces, at = [], 0
    for a, b in spans:
        pieces += [(text[at:a], False), (text[a:b], True)]
        at = b
    return [(p, plain) for p, plain in [*pieces, (text[at:], False)] if p]


def encode_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens added) and each token's character span; in a
    Templated text, special-token text inside message contents is encoded as text."""
    from pertoken.errors import PertokenError

    ids, offsets, at = [], [], 0
    pieces = _pieces(text, special_pattern(tokenizer)) if _marked(text) else [(text, False)]
    for piece, plain in pieces:
        try:
            enc = tokenizer(
                piece, add_special_tokens=False, return_offsets_mapping=True, **_split(plain)
            )
        except NotImplementedError:
            raise PertokenError(
                "this model's tokenizer gives no character offsets: tracing needs a fast "
                "(tokenizers-based) tokenizer, which transformers makes from tokenizer.json"
            ) from None
        ids += enc["input_ids"]
        offsets += [(int(s) + at, int(e) + at) for s, e in enc["offset_mapping"]]
        at += len(piece)
    return ids, offsets


def _marked(text: str) -> bool:
    return bool(getattr(text, "content", ()))


def _split(plain: bool) -> dict:
    return {"split_special_tokens": True} if plain else {}


class ChatText:
    """The text side of a Backend, shared by both: chat templates, encoding and decoding with
    a Hugging Face tokenizer held as `self.tokenizer`."""

    tokenizer: object

    def chat_prompt(self, system: str | None, user: str) -> str:
        """Chat template with the generation prompt; no system role -> "{system}\n\n{user}"."""
        return render_chat(self.tokenizer, system, user)

    def chat_messages(self, messages: list[dict]) -> str:
        """A multi-turn chat with the generation prompt added."""
        return self.chat_text(messages, add_generation_prompt=True)

    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The chat through the template. Special-token text inside a message's content stays
        text when encoded (a Templated string), unless `special_tokens_in_content` is set."""
        gen = add_generation_prompt
        text = render_messages(self.tokenizer, messages, add_generation_prompt=gen)
        pattern = special_pattern(self.tokenizer)
        if getattr(self, "special_tokens_in_content", False) or not any(
            pattern and pattern.search(m["content"]) for m in messages
        ):
            return text
        return as_text(text, content_spans(self.tokenizer, messages, text, gen))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without adding special tokens; in a Templated text, special-token
        text inside message contents is encoded as text."""
        if not _marked(text):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return [
            i
            for piece, plain in _pieces(text, special_pattern(self.tokenizer))
            for i in self.tokenizer.encode(piece, add_special_tokens=False, **_split(plain))
        ]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return encode_offsets(self.tokenizer, text)
