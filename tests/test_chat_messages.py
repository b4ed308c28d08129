"""Multi-turn chats through the chat template (the server's messages), on both backends."""

import importlib.util

import pytest

from pertoken.backends import load_backend

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])


@pytest.mark.parametrize("name", BACKENDS)
def test_one_turn_equals_chat_prompt(model_dir, name):
    bk = load_backend(str(model_dir), name, dtype="float32", device="cpu")
    for system in (None, "Be brief."):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "hi"}
        ]
        assert bk.chat_messages(msgs) == bk.chat_prompt(system, "hi")


def test_turns_in_order_and_system_without_a_system_role(llama_dir, gemma_dir):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second"},
    ]
    llama = load_backend(str(llama_dir), "torch").chat_messages(chat)
    assert llama.index("Be brief.") < llama.index("first") < llama.index("answer one")
    assert llama.index("answer one") < llama.index("second")
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    gemma = load_backend(str(gemma_dir), "torch").chat_messages(chat)
    assert "<start_of_turn>user\nBe brief.\n\nfirst<end_of_turn>" in gemma
    assert "<start_of_turn>model\nanswer one<end_of_turn>" in gemma
    assert gemma.endswith("<start_of_turn>model\n")
