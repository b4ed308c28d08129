"""The banner `run` prints first, and the settings it reports before loading a model."""

import pytest

from pertoken.backends import choose_settings
from pertoken.pipeline.banner import banner, judge_endpoint
from pertoken.pipeline.options import JudgeSettings, ModelChoice


def test_banner_lines_align_and_take_reasons():
    text = banner(
        ModelChoice("org/m", "torch", dtype="float32", device="cpu"),
        JudgeSettings("gpt-x", base_url="http://host/v1"),
        "runs/m/evil",
        why={"device": "no CUDA device"},
    )
    assert text.splitlines() == [
        "model    org/m",
        "backend  torch",
        "device   cpu  (no CUDA device)",
        "dtype    float32",
        "judge    gpt-x at http://host/v1",
        "output   runs/m/evil",
    ]


def test_judge_endpoint_never_shows_a_password(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert judge_endpoint("gpt-x", None) == "https://api.openai.com/v1"
    assert judge_endpoint("gpt-x", "http://me:s3cret@host:8000/v1") == "http://host:8000/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "https://proxy.example/v1")
    assert judge_endpoint("gpt-x", None) == "https://proxy.example/v1"
    assert judge_endpoint("local:org/m", None) == "this machine (in-process)"


@pytest.mark.parametrize("name", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_chosen_settings_are_what_loading_picks(name, llama_dir):
    if name == "mlx":
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm")
    from pertoken.backends import load_backend

    chosen = choose_settings(str(llama_dir), name, device="cpu")
    b = load_backend(str(llama_dir), name, device="cpu")
    assert chosen == (b.name, b.device, b.dtype) == (name, "cpu", "float32")
    assert choose_settings(str(llama_dir), name, dtype="bfloat16", device="cpu")[2] == "bfloat16"
