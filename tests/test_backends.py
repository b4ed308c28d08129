"""Choosing a backend and a model, with the platform probe faked: auto = MLX on an Apple Silicon
Mac that has it, the default model per backend, and a warning on a Mac without MLX."""

import warnings

import pytest
from click.testing import CliRunner

import pertoken.backends as backends
import pertoken.pipeline.run
from pertoken.backends import machine, memory
from pertoken.backends.machine import Machine
from pertoken.cli import main
from pertoken.errors import PertokenWarning
from pertoken.pipeline.run import RunReport

MAC = Machine("Darwin", "arm64")
LINUX = Machine("Linux", "x86_64")
INTEL_MAC = Machine("Darwin", "x86_64")
GEMMA_9B_4BIT = {
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "vocab_size": 256000,
    "quantization": {"group_size": 64, "bits": 4},
}


@pytest.fixture
def on(monkeypatch):
    """on(machine, mlx=...): fake the platform and whether MLX is installed."""
    monkeypatch.setattr(backends, "_warned", set())
    real = backends.is_installed

    def fake(here, *, mlx=True):
        monkeypatch.setattr(machine, "this_machine", lambda: here)
        monkeypatch.setattr(backends, "is_installed", lambda n: mlx if n == "mlx" else real(n))

    return fake


def no_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    assert [str(w.message) for w in caught] == []
    return result


def test_auto_picks_mlx_on_apple_silicon_with_mlx(on):
    on(MAC)
    assert no_warnings(backends.resolve, "auto") == "mlx"
    assert backends.choose().reason == "Apple Silicon with MLX installed"
    assert backends.backend_class("auto").__name__ == "MLXBackend"


@pytest.mark.parametrize("here", [LINUX, INTEL_MAC])
def test_auto_picks_torch_off_apple_silicon_without_warning(on, here):
    on(here, mlx=True)
    assert no_warnings(backends.resolve, "auto") == "torch"
    assert str(here) in backends.choose().reason


def test_explicit_backend_wins_over_the_platform(on):
    on(MAC)
    assert backends.resolve("torch") == "torch"
    on(LINUX)
    assert backends.resolve("mlx") == "mlx"  # mlx[cpu] runs here


def test_default_model_per_backend(on):
    assert backends.default_model("torch") == "google/gemma-2-9b-it"
    assert backends.default_model("mlx") == "mlx-community/gemma-2-9b-it-4bit"
    on(MAC)
    assert backends.default_model() == "mlx-community/gemma-2-9b-it-4bit"
    on(LINUX)
    assert backends.default_model() == "google/gemma-2-9b-it"
    assert pertoken.pipeline.run.default_model is backends.default_model  # one function


def test_mac_without_mlx_warns_once_with_the_install_command(on):
    on(MAC, mlx=False)
    with pytest.warns(PertokenWarning, match=r'pip install "pertoken\[mlx\]"'):
        assert backends.resolve("auto") == "torch"
    assert no_warnings(backends.resolve, "auto") == "torch"  # once per process
    assert "Apple Silicon without MLX" in backends.choose().reason


def test_describe_choice_says_which_and_why(on):
    on(MAC)
    assert backends.describe_choice() == (
        "backend mlx (--backend auto: Apple Silicon with MLX installed); "
        "model mlx-community/gemma-2-9b-it-4bit (the mlx default)"
    )
    line = backends.describe_choice("torch", "some/model")
    assert line == "backend torch (asked for with --backend); model some/model (--model)"


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """Replace run_pipeline by one that records its options."""
    seen = {}

    def run_pipeline(model, trait, *, generation, **options):
        seen.update(options, model=model.model, trait=trait, batch_size=generation.batch_size)
        return RunReport(tmp_path, {}, 0, 0, {})

    monkeypatch.setattr(pertoken.pipeline.run, "run_pipeline", run_pipeline)
    return seen


def test_run_without_model_uses_the_mlx_default_with_a_batch_from_memory(on, fake_run, monkeypatch):
    on(MAC)
    sizes = {"model.safetensors": 5_200_000_000}
    monkeypatch.setattr(memory, "repo_files", lambda m: sizes)
    monkeypatch.setattr(memory, "repo_config", lambda m: GEMMA_9B_4BIT)
    monkeypatch.setattr(machine, "mlx_budget", lambda: (11_453_251_584, "Metal"))
    r = CliRunner().invoke(main, ["run", "--trait", "paternalism"])
    assert r.exit_code == 0, r.output
    assert fake_run["model"] == "mlx-community/gemma-2-9b-it-4bit"
    assert "backend  mlx  (--backend auto: Apple Silicon with MLX installed)" in r.output
    fit = memory.check_fit(fake_run["model"], max_new_tokens=1000)
    assert fake_run["batch_size"] == fit.batch_size and fit.batch_size > 1
    assert f"fits, batches of {fit.batch_size}" in r.output


def test_run_without_model_on_torch_uses_the_torch_default(on, fake_run):
    on(LINUX)
    r = CliRunner().invoke(main, ["run", "--trait", "paternalism", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    assert fake_run["model"] == "google/gemma-2-9b-it" and fake_run["batch_size"] == 3
    assert "model    google/gemma-2-9b-it  (the torch default)" in r.output
    assert "memory" not in r.output  # torch's devices manage their own memory


def test_run_on_a_mac_without_mlx_warns_once(on, fake_run):
    on(MAC, mlx=False)
    r = CliRunner().invoke(main, ["run", "--trait", "paternalism"])
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: MLX is not installed") == 1
    assert "Traceback" not in r.output and "UserWarning" not in r.output
    assert fake_run["model"] == "google/gemma-2-9b-it"
