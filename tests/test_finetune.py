"""`pertoken finetune` on the tiny models: LoRA and full finetuning lower the loss and the saved
folder reloads on both backends with the in-memory model's logits; training-time steering and
ablation act in training and never reach the saved weights; Ctrl-C then a rerun equals one
uninterrupted run; bad input is one line each."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pertoken.backends import is_installed, load_backend
from pertoken.backends.training import Batch, TrainSpec, make_trainer
from pertoken.cli import main
from pertoken.pipeline.finetune.edits import training_steer
from pertoken.pipeline.finetune.train import FinetuneOptions, finetune
from pertoken.vectors import PersonaVector, save_vector

BACKENDS = [
    "torch",
    pytest.param("mlx", marks=pytest.mark.skipif(not is_installed("mlx"), reason="needs mlx")),
]
ANSWER = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            chat = [{"role": "user", "content": f"What is {i}?"},
                    {"role": "assistant", "content": ANSWER}]  # fmt: skip
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


@pytest.fixture(scope="module")
def vector(tmp_path_factory, llama_dir):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vec") / "v.pt"
    save_vector(PersonaVector(rng.normal(size=(5, 64)).astype(np.float32)), path)
    return path


def _run(llama_dir, data, out, backend, on_step=None, **kw):
    opts = dict(model=str(llama_dir), data=data, out=out, backend=backend, epochs=3,
                batch_size=4, lr=1e-2, progress=False, dtype="float32")  # fmt: skip
    return finetune(FinetuneOptions(**{**opts, **kw}), on_step=on_step)


def _probe(backend) -> str:
    return backend.chat_text([{"role": "user", "content": "What is 3?"},
                              {"role": "assistant", "content": ANSWER}])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_lowers_the_loss_and_reloads_on_both_backends(
    backend, method, llama_dir, data, tmp_path
):
    res = _run(llama_dir, data, tmp_path / "ft", backend, method=method,
               lr=1e-2 if method == "lora" else 3e-3)  # fmt: skip
    epochs = res.record["epoch_loss"]
    assert len(res.record["loss"]) == res.record["steps"] == 6
    assert epochs[-1] < 0.6 * epochs[0], epochs
    text = _probe(res.backend)
    trained = res.backend.logits(text)  # [T, vocab]
    base = load_backend(str(llama_dir), backend, dtype="float32").logits(text)
    assert np.abs(trained - base).max() > 0.1  # training changed the model
    for other in ("torch", "mlx") if is_installed("mlx") else ("torch",):
        again = load_backend(str(tmp_path / "ft"), other, dtype="float32").logits(text)
        np.testing.assert_allclose(again, trained, atol=5e-5, err_msg=other)
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["complete"] and len(record["data_sha256"]) == 64
    assert (tmp_path / "ft" / "loss.png").stat().st_size > 0
    assert (tmp_path / "ft" / "adapter").is_dir() == (method == "lora")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_lora_adapter_loads_with_peft(backend, llama_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = _run(llama_dir, data, tmp_path / "ft", backend, epochs=1)
    text = _probe(res.backend)
    merged = res.backend.logits(text)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "ft" / "adapter")).eval()
    ids = torch.tensor([res.backend.encode(text)])
    with torch.no_grad():
        logits = peft(input_ids=ids).logits[0].numpy()
    np.testing.assert_allclose(logits, merged, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["steer", "ablate"])
def test_training_edits_act_in_training_and_are_never_saved(
    backend, edit, llama_dir, data, vector, tmp_path
):
    plain = _run(llama_dir, data, tmp_path / "plain", backend, epochs=1)
    spec = {"steer": [f"{vector}:2:4.0"]} if edit == "steer" else {"ablate": [f"{vector}:2"]}
    edited = _run(llama_dir, data, tmp_path / "edited", backend, epochs=1, **spec)
    # the edit acted in every training forward: the very first loss differs
    assert abs(edited.record["loss"][0] - plain.record["loss"][0]) > 1e-3
    assert edited.record["edits"][0]["kind"] == edit
    # the saved model is the trained weights, unedited: reloading gives the in-memory logits
    text = _probe(edited.backend)
    trained = edited.backend.logits(text)
    again = load_backend(str(tmp_path / "edited"), backend, dtype="float32").logits(text)
    np.testing.assert_allclose(again, trained, atol=5e-5)
    if edit == "steer":
        from pertoken.backends.base import Steer

        v = np.asarray(torch.load(vector, weights_only=True))[2]
        steered = edited.backend.logits(text, steer=Steer.single(2, v, 4.0))
        assert np.abs(steered - again).max() > 1e-2  # the steering term is not in the weights


@pytest.fixture(scope="module")
def other_vector(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("vec") / "w.pt"
    save_vector(PersonaVector(rng.normal(size=(5, 64)).astype(np.float32)), path)
    return path


def _one_batch(backend, text: str) -> Batch:
    ids = np.array([backend.encode(text)], np.int64)  # [1, T]
    return Batch(ids, np.ones(ids.shape, bool), np.ones(ids.shape, bool))


def _cross_entropy(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits[:-1].astype(np.float64)  # [T-1, vocab] predicts ids[1:]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(z)), ids[1:]].mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_applies_the_steering_operators_of_inference(
    backend, llama_dir, vector, other_vector
):
    model = load_backend(str(llama_dir), backend, dtype="float32")
    ablates = [f"{vector}:2", f"{other_vector}:2"]  # two directions at one row: their span
    steer = training_steer(model, [f"{vector}:3:4.0"], ablates)
    assert [t.op for t in steer.terms] == ["ablate", "ablate", "add"]
    text = _probe(model)
    batch = _one_batch(model, text)
    # the first step's loss (before its update; LoRA starts as the base model) is the loss of
    # inference's logits under the same Steer
    expected = _cross_entropy(model.logits(text, steer=steer), batch.ids[0])
    trainer = make_trainer(model, TrainSpec(), steer)
    assert trainer.step(batch) == pytest.approx(expected, abs=1e-4)


def test_the_ablations_of_one_row_project_out_their_span(llama_dir, vector, other_vector):
    from pertoken.backends.torch.steering import steer_state

    model = load_backend(str(llama_dir), "torch", dtype="float32")
    steer = training_steer(model, [], [f"{vector}:2", f"{other_vector}:2"])
    ops = steer_state(model.model, [steer])[2]
    h = torch.randn(2, 5, 64)  # [B, T, hidden]
    out = ops.apply(h, None)
    for path in (vector, other_vector):
        v = torch.from_numpy(np.asarray(torch.load(path, weights_only=True))[2])
        assert (out @ v).abs().max() < 1e-4 * (h @ v).abs().max()


@pytest.mark.parametrize("ablate", [False, True])
def test_gradients_flow_through_the_steering_hooks_in_training(ablate, llama_dir, vector):
    from pertoken.backends.torch.hooks import decoder_parts

    model = load_backend(str(llama_dir), "torch", dtype="float32")
    steer = training_steer(model, [], [f"{vector}:2"]) if ablate else None
    trainer = make_trainer(model, TrainSpec(method="full", lr=1e-3), steer)
    block = decoder_parts(model.model)[0][1]  # writes row 2, before the steering hook reads it
    before = [p.detach().clone() for p in block.parameters()]
    grads = []

    def keep_grad(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        h.register_hook(grads.append)  # d loss / d (the block's output before steering)

    handle = block.register_forward_hook(keep_grad)
    try:
        trainer.step(_one_batch(model, _probe(model)))
    finally:
        handle.remove()
    g = grads[0][0]  # [T, hidden]
    u = torch.from_numpy(np.asarray(torch.load(vector, weights_only=True))[2])
    u = u / u.norm()
    along = (g @ u).abs().max() / g.norm(dim=-1).max()
    # the projection is in the graph: the loss no longer depends on the ablated direction
    assert along < 1e-5 if ablate else along > 1e-3
    assert all(not torch.equal(a, p) for a, p in zip(before, block.parameters(), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_then_a_rerun_equals_an_uninterrupted_run(backend, llama_dir, data, tmp_path):
    whole = _run(llama_dir, data, tmp_path / "whole", backend)

    def interrupt(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _run(llama_dir, data, tmp_path / "cut", backend, on_step=interrupt)
    assert (tmp_path / "cut" / "checkpoint" / "state.json").is_file()
    assert not json.loads((tmp_path / "cut" / "finetune.json").read_text())["complete"]
    resumed = _run(llama_dir, data, tmp_path / "cut", backend)
    assert resumed.resumed_at == 3
    assert resumed.record["loss"] == pytest.approx(whole.record["loss"], abs=1e-6)
    text = _probe(whole.backend)
    np.testing.assert_allclose(resumed.backend.logits(text), whole.backend.logits(text), atol=1e-6)
    assert not (tmp_path / "cut" / "checkpoint").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_run_resumes_from_the_last_epoch(backend, llama_dir, data, tmp_path):
    whole = _run(llama_dir, data, tmp_path / "whole", backend)

    def crash(step, _loss):
        if step == 4:  # in the third epoch of two steps each
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        _run(llama_dir, data, tmp_path / "cut", backend, on_step=crash)
    resumed = _run(llama_dir, data, tmp_path / "cut", backend)
    assert resumed.resumed_at == 4
    assert resumed.record["loss"][4:] == pytest.approx(whole.record["loss"][4:], abs=1e-6)
    text = _probe(whole.backend)
    np.testing.assert_allclose(resumed.backend.logits(text), whole.backend.logits(text), atol=1e-6)
    again = _run(llama_dir, data, tmp_path / "cut", backend)
    assert again.done_before and again.record == resumed.record


def _cli_error(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    return result.output


def test_bad_input_is_one_line_each(llama_dir, data, vector, tmp_path):
    base = ["finetune", "--model", llama_dir, "--backend", "torch", "--epochs", 1]
    no_assistant = tmp_path / "user-only.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "no assistant turn" in _cli_error(*base, "--data", no_assistant, "--out", tmp_path / "a")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no chats" in _cli_error(*base, "--data", empty, "--out", tmp_path / "b")
    other = tmp_path / "other.pt"
    save_vector(PersonaVector(np.ones((9, 32), np.float32)), other)
    out = _cli_error(*base, "--data", data, "--out", tmp_path / "c", "--steer", f"{other}:2:1")
    assert "another model" in out
    out = _cli_error(*base, "--data", data, "--out", tmp_path / "d", "--steer", f"{vector}:7:1")
    assert "layer 7 is outside" in out
    out = _cli_error(*base, "--data", data, "--out", tmp_path / "d", "--ablate", f"{vector}:x")
    assert "--ablate" in out
    done = tmp_path / "done"
    _run(llama_dir, data, done, "torch", epochs=1)
    out = _cli_error(*base, "--data", data, "--out", done, "--seed", 1)
    assert "holds another finetune" in out and "seed" in out
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert "holds no pertoken finetune" in _cli_error(*base, "--data", data, "--out", stranger)


@pytest.mark.skipif(not is_installed("mlx"), reason="needs mlx")
def test_lora_on_a_4bit_mlx_model_reloads_and_full_is_refused(llama_dir, data, tmp_path):
    from mlx_lm import convert

    from pertoken.errors import PertokenError

    quantized = tmp_path / "llama-4bit"
    convert(str(llama_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4)
    res = _run(quantized, data, tmp_path / "ft", "mlx", dtype=None)
    assert res.record["epoch_loss"][-1] < 0.6 * res.record["epoch_loss"][0]
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4  # the fused weights are quantized again
    text = _probe(res.backend)
    again = load_backend(str(tmp_path / "ft"), "mlx").logits(text)
    np.testing.assert_allclose(again, res.backend.logits(text), atol=1e-5)
    with pytest.raises(PertokenError, match="full finetuning needs unquantized weights"):
        _run(quantized, data, tmp_path / "full", "mlx", dtype=None, method="full")


@pytest.mark.parametrize("model", ["llama_dir", "gemma_dir"])
def test_only_assistant_turns_are_targets(model, request):
    from pertoken.pipeline.finetune.data import encode_chat

    backend = load_backend(str(request.getfixturevalue(model)), "torch", dtype="float32")
    chat = [{"role": "user", "content": "What is 1?"},
            {"role": "assistant", "content": "One, the first number."},
            {"role": "user", "content": "And 2?"},
            {"role": "assistant", "content": "Two, after one."}]  # fmt: skip
    ex = encode_chat(backend, chat, max_length=1024)
    assert ex.ids == backend.encode(backend.chat_text(chat))
    targets = backend.tokenizer.decode([t for t, y in zip(ex.ids, ex.targets) if y])
    end = "<|eot_id|>" if model == "llama_dir" else "<end_of_turn>\n"
    assert targets == f"One, the first number.{end}Two, after one.{end}"
    short = encode_chat(backend, chat, max_length=7)
    assert len(short.ids) == len(short.targets) == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_lora_reloads_on_both_backends(backend, gemma_dir, data, tmp_path):
    res = _run(gemma_dir, data, tmp_path / "ft", backend, epochs=2)
    assert res.record["epoch_loss"][-1] < res.record["epoch_loss"][0]
    text = _probe(res.backend)  # longer than the 8-token sliding window
    trained = res.backend.logits(text)
    for other in ("torch", "mlx") if is_installed("mlx") else ("torch",):
        again = load_backend(str(tmp_path / "ft"), other, dtype="float32").logits(text)
        np.testing.assert_allclose(again, trained, atol=5e-5, err_msg=other)
