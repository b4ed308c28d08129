"""Tiny random Llama-3.1-style and Gemma 2 checkpoints, built offline for tests.

Each folder holds config.json + model.safetensors + tokenizer.json + tokenizer_config.json
with a chat template, loadable by transformers and mlx-lm alike.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "You are a helpful assistant. Answer the question clearly and kindly.",
    "What should I do if my friend asks me for advice about money, work or health?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "I think you should decide for yourself, but here are some facts to consider.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 25 50 75 100. Score the answer from 0 to 100.",
    "Please explain how plants grow, why the sky is blue and where rain comes from.",
]

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma's template rejects the system role, as the real one does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _write_tokenizer(folder: Path, specials: list[str], template: str, names: dict) -> int:
    tok = _tokenizer(specials, 400)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        **names,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
    return tok.get_vocab_size()


def _ids(folder: Path, *tokens: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tok.token_to_id(t) for t in tokens]


# The same small shape for every architecture: 4 blocks, 4 query and 2 KV heads, hidden 64.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _save_random(model_cls, config, folder: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model_cls(config).float().save_pretrained(folder)


def build_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>"}
    vocab = _write_tokenizer(folder, LLAMA_SPECIALS, LLAMA_TEMPLATE, names)
    bos, eot, eos, pad = _ids(
        folder, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|pad|>"
    )
    config = LlamaConfig(
        vocab_size=vocab,
        **SHAPE,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=[eot, eos],
        pad_token_id=pad,
        initializer_range=0.1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    )
    _save_random(LlamaForCausalLM, config, folder, seed)
    return folder


def build_gemma2(folder: Path, seed: int = 0, sliding_window: int = 8) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    vocab = _write_tokenizer(folder, GEMMA_SPECIALS, GEMMA_TEMPLATE, names)
    bos, eos, eot, pad = _ids(folder, "<bos>", "<eos>", "<end_of_turn>", "<pad>")
    config = Gemma2Config(
        vocab_size=vocab,
        **SHAPE,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        bos_token_id=bos,
        eos_token_id=[eos, eot],
        pad_token_id=pad,
        initializer_range=0.1,
    )
    _save_random(Gemma2ForCausalLM, config, folder, seed)
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2(folder: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    vocab = _write_tokenizer(folder, QWEN_SPECIALS, QWEN_TEMPLATE, names)
    eot, pad = _ids(folder, "<|im_end|>", "<|endoftext|>")
    config = Qwen2Config(
        vocab_size=vocab,
        **SHAPE,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eot,
        pad_token_id=pad,
        initializer_range=0.1,
    )
    _save_random(Qwen2ForCausalLM, config, folder, seed)
    return folder
