"""What only the MLX backend does; the Backend protocol itself is test_backend_contract.py."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'pertoken[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'pertoken[mlx]')")

from pertoken.backends import Steer, load_backend  # noqa: E402
from pertoken.errors import PertokenError  # noqa: E402
from tests.reference import ANSWERS, chat_prompts, rand  # noqa: E402


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend(str(model_dir), "mlx", dtype="float32", device="cpu")


prompts = chat_prompts


def test_default_dtype_on_cpu_is_float32(llama_dir):
    assert load_backend(str(llama_dir), "mlx").dtype == "float32"


def test_cli_loads_the_mlx_backend(llama_dir):
    from pertoken.backends.mlx import MLXBackend
    from pertoken.commands.options import load_model
    from pertoken.pipeline.options import ModelChoice

    b = load_model(ModelChoice(str(llama_dir), "mlx", None, "cpu"))
    assert isinstance(b, MLXBackend) and b.device == "cpu"
    with pytest.raises(PertokenError, match="gpu or cpu"):
        load_model(ModelChoice(str(llama_dir), "mlx", None, "cuda"))


def test_bfloat16_tracks_float32(llama_dir):
    f32 = load_backend(str(llama_dir), "mlx", dtype="float32")
    bf16 = load_backend(str(llama_dir), "mlx", dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    p = prompts(f32)[0]
    a, b = f32.summaries([p], [ANSWERS[0]]), bf16.summaries([p], [ANSWERS[0]])
    assert b.response_avg.dtype == np.float32
    rel = np.linalg.norm(a.response_avg - b.response_avg, axis=-1) / np.linalg.norm(
        a.response_avg, axis=-1
    )
    assert rel.max() < 0.05


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory):
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q4") / f"{model_dir.name}-4bit"
    convert(str(model_dir), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


def test_quantized_checkpoint_runs_every_method(quantized_dir, backend):
    import mlx.nn as nn

    q = load_backend(str(quantized_dir), "mlx", dtype="float32")
    assert json.loads((quantized_dir / "config.json").read_text())["quantization"]["bits"] == 4
    assert isinstance(q.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ps = prompts(q)
    s = q.summaries(ps, ANSWERS)
    assert s.response_avg.shape == (3, 5, 64) and np.isfinite(s.response_avg).all()
    full = backend.summaries(ps, ANSWERS)
    cos = (s.response_avg * full.response_avg).sum(-1) / (
        np.linalg.norm(s.response_avg, axis=-1) * np.linalg.norm(full.response_avg, axis=-1)
    )
    assert cos.min() > 0.9  # the dequantised residual stream stays close to the original
    steer = Steer.single(2, rand(6), 4.0, positions="response")
    out = q.generate(ps, max_new_tokens=6, temperature=0, steer=steer)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    t = q.trace(ps[0], rows=[1, 4], max_new_tokens=5, steer=steer)
    assert t.hidden.shape == (len(t.token_ids), 2, 64) and np.isfinite(t.hidden).all()
    assert np.isfinite(q.logits(ps[0], steer=steer)).all()
    assert np.isfinite(q.next_token_logprobs(ps)).all()


def test_unsupported_architecture_is_a_clear_error(tmp_path, llama_dir):
    other = tmp_path / "gpt2"
    shutil.copytree(llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(PertokenError, match="llama, mistral, qwen2, gemma2"):
        load_backend(str(other), "mlx")
