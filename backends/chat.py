"""Chat templates, stop tokens and offsets on a Hugging Face tokenizer (both backends)."""

from __future__ import annotations

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


def encode_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens added) and each token's character span."""
    from pertoken.errors import PertokenError

    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise PertokenError(
            "this model's tokenizer gives no character offsets: tracing needs a fast "
            "(tokenizers-based) tokenizer, which transformers makes from tokenizer.json"
        ) from None
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


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
        return render_messages(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without adding special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return encode_offsets(self.tokenizer, text)
