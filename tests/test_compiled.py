"""The compiled decode step (static cache, buffers, CUDA graph on CUDA) against the eager loop."""

import numpy as np
import pytest
import torch

from pertoken.backends import Steer
from pertoken.backends.torch import TorchBackend
from pertoken.backends.torch.compiled import StaticStep
from pertoken.errors import PertokenError
from tests.reference import chat_prompts

NEW = 20


@pytest.fixture(scope="module")
def pair(model_dir):
    """(eager, compiled) backends on the same checkpoint, float32 on the CPU."""
    load = dict(dtype="float32", device="cpu")
    return TorchBackend.load(str(model_dir), **load), TorchBackend.load(
        str(model_dir), compile=True, **load
    )


def _steer(backend, row=2, coef=4.0, positions="response", seed=0):
    vec = np.random.default_rng(seed).standard_normal(backend.hidden_size).astype(np.float32)
    return Steer.single(row, vec, coef, positions=positions)


def _prompts(backend) -> list[str]:
    ps = chat_prompts(backend)
    window = getattr(backend.model.config, "sliding_window", None)
    if window:  # Gemma 2: the longest prompt and its answer run well past the window
        assert max(len(backend.encode(p)) for p in ps) > 2 * window
    return ps


@pytest.mark.parametrize("positions", ["response", "all", "prompt"])
def test_greedy_equals_eager_batched_steered_and_not(pair, positions, torch_one_thread):
    eager, compiled = pair
    ps = _prompts(eager)
    for steer in (None, _steer(eager, positions=positions)):
        want = eager.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer, batch_size=3)
        got = compiled.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer, batch_size=3)
        assert got == want
    assert any(want)
    unsteered = eager.generate(ps, max_new_tokens=NEW, temperature=0, batch_size=3)
    assert unsteered != want  # the steering is strong enough to change the answers


def test_greedy_equals_eager_one_prompt_at_a_time(pair, model_dir, torch_one_thread):
    eager = pair[0]
    compiled = TorchBackend.load(str(model_dir), dtype="float32", device="cpu", compile=True)
    steer = _steer(eager)
    for p in _prompts(eager):
        for s in (None, steer):
            want = eager.generate([p], max_new_tokens=NEW, temperature=0, steer=s)
            assert compiled.generate([p], max_new_tokens=NEW, temperature=0, steer=s) == want
    assert compiled.compiled._step.shape.batch == 1


def test_seeded_samples_equal_eager(pair, torch_one_thread):
    # same logits, same sampler, same generator: the same draws
    eager, compiled = pair
    ps = _prompts(eager)
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=5, steer=_steer(eager))
    assert compiled.generate(ps, batch_size=3, **kw) == eager.generate(ps, batch_size=3, **kw)


def test_smaller_batches_reuse_the_step_with_padding_slots(pair, torch_one_thread):
    eager, compiled = pair
    ps = _prompts(eager) + _prompts(eager)[:2]  # batches of 3 and 2
    want = eager.generate(ps, max_new_tokens=NEW, temperature=0, batch_size=3)
    got = compiled.generate(ps, max_new_tokens=NEW, temperature=0, batch_size=3)
    step = compiled.compiled._step
    assert got == want
    p = ps[1]  # one prompt through the 3-slot step
    assert compiled.generate([p], max_new_tokens=NEW, temperature=0) == eager.generate(
        [p], max_new_tokens=NEW, temperature=0
    )
    kw = dict(max_new_tokens=NEW, temperature=1.0, seed=2)  # padding slots draw nothing
    assert compiled.generate([p], **kw) == eager.generate([p], **kw)
    assert compiled.compiled._step is step and step.shape.batch == 3


def test_trace_equals_eager(pair, torch_one_thread):
    eager, compiled = pair
    p, steer = _prompts(eager)[1], _steer(eager)
    seen = []
    want = eager.trace(p, max_new_tokens=NEW, rows=[0, 2, 4], steer=steer)
    got = compiled.trace(
        p, max_new_tokens=NEW, rows=[0, 2, 4], steer=steer, on_token=lambda *a: seen.append(a)
    )
    assert got.token_ids == want.token_ids and len(got.token_ids) > 0
    assert got.hidden.shape == want.hidden.shape
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-4, atol=1e-4)
    assert [i for i, _, _ in seen] == list(range(len(got.token_ids)))


def test_new_steering_reuses_the_same_buffers(pair, torch_one_thread):
    # Vectors, coefficients, layers and positions are copied into the step's buffers: the
    # step (and on CUDA its graph) stays the one built first.
    eager, compiled = pair
    ps = _prompts(eager)
    compiled.generate(ps, max_new_tokens=4, temperature=0, batch_size=3)
    step = compiled.compiled._step
    buffers = {i: t.data_ptr() for i, t in step.steer.items()}
    for steer in (_steer(eager, 1, 2.0), _steer(eager, 3, -4.0, "all", seed=1)):
        want = eager.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer, batch_size=3)
        assert compiled.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer) == want
        assert compiled.compiled._step is step
        assert {i: t.data_ptr() for i, t in step.steer.items()} == buffers


def test_attention_without_a_mask_interface_is_one_clear_error(llama_dir):
    b = TorchBackend.load(str(llama_dir), dtype="float32", device="cpu")
    b.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PertokenError, match="needs sdpa or eager attention.*without --compile"):
        TorchBackend(b.model, b.tokenizer, model_id="m", dtype="f32", device="cpu", compile=True)


@pytest.mark.slow
def test_step_traces_as_one_graph(gemma_dir, monkeypatch, torch_one_thread):
    # fullgraph=True fails on any graph break: no host sync and no branching on tensor values
    # inside the step, hooks and steering included.
    eager = TorchBackend.load(str(gemma_dir), dtype="float32", device="cpu")
    compiled = TorchBackend.load(str(gemma_dir), dtype="float32", device="cpu", compile=True)
    traced = torch.compile(StaticStep.step, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(StaticStep, "step", traced)
    ps, steer = _prompts(eager), _steer(eager)
    want = eager.generate(ps, max_new_tokens=12, temperature=0, steer=steer, batch_size=3)
    assert compiled.generate(ps, max_new_tokens=12, temperature=0, steer=steer) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_equals_eager(llama_dir):
    eager = TorchBackend.load(str(llama_dir), dtype="float32", device="cuda")
    compiled = TorchBackend.load(str(llama_dir), dtype="float32", device="cuda", compile=True)
    ps = chat_prompts(eager)
    for steer in (None, _steer(eager), _steer(eager, 3, -2.0)):
        want = eager.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer, batch_size=3)
        assert compiled.generate(ps, max_new_tokens=NEW, temperature=0, steer=steer) == want
    assert compiled.compiled.captures == 1
    assert compiled.compiled.warmup_seconds > 0


def test_cli_generate_with_compile_writes_the_eager_csv(llama_dir, tmp_path, torch_one_thread):
    from click.testing import CliRunner

    from pertoken.cli import main
    from tests.small_kit import write_kit

    kit = write_kit(tmp_path)
    base = ["generate", "-m", str(llama_dir), "--backend", "torch", "--device", "cpu"]
    base += ["-t", str(kit), "--n-per-question", "1", "--max-new-tokens", "8"]
    eager = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "eager.csv")])
    compiled = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c.csv"), "--compile"])
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    assert "compiled decode step: static KV cache" in compiled.output
    assert (tmp_path / "c.csv").read_text() == (tmp_path / "eager.csv").read_text()


def test_compile_on_mlx_is_one_clear_error(llama_dir):
    pytest.importorskip("mlx")
    from pertoken.backends import load_backend

    with pytest.raises(PertokenError, match="--compile is for the torch backend"):
        load_backend(str(llama_dir), "mlx", compile=True)
