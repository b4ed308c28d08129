"""Chat templates, stop tokens and token pieces on a Hugging Face tokenizer (both backends)."""

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


def render_messages(tokenizer, messages: list[dict]) -> str:
    """A multi-turn chat templated with the generation prompt; without a system role, system
    text joins the first user turn as render_chat does ("{system}\\n\\n{user}")."""
    if messages and messages[0]["role"] == "system" and not _has_system_role(tokenizer):
        system, rest = messages[0]["content"], list(messages[1:])
        if rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
        messages = rest
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


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text (prefix differences keep multi-byte characters)."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(text[len(prev) :])
        prev = text
    return pieces
