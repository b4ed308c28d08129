"""Will a model fit: weights from files, hub metadata or config; the too-big error naming a
variant that fits; the batch from what is left. The file, config and memory probes are faked."""

import time

import pytest
from click.testing import CliRunner

import pertoken.backends as backends
from pertoken.backends import machine, memory
from pertoken.backends.memory import check_fit, count_params, estimate_weights, require_fit
from pertoken.cli import main
from pertoken.errors import PertokenError

GB = 1_000_000_000
MAC_16GB = (11_453_251_584, "Metal's recommended working set")  # what Metal reports on 16 GB
MAC_32GB = (22_906_503_168, "Metal's recommended working set")
GEMMA_9B = {
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "vocab_size": 256000,
    "torch_dtype": "float32",  # as Google's config says, for bfloat16 files
}
LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GEMMA_SHARDS = {f"model-0000{i}-of-00004.safetensors": 4_621_000_000 for i in range(1, 5)}


def quantized(config, bits):
    return {**config, "quantization": {"group_size": 64, "bits": bits}}


def probes(config, files=None):
    return {"config": lambda m: config, "files": lambda m: files}


def test_parameter_counts_match_the_published_ones():
    assert count_params(GEMMA_9B) == pytest.approx(9_241_705_984, rel=1e-3)
    assert count_params(LLAMA_8B) == pytest.approx(8_030_261_248, rel=1e-3)
    assert count_params({"hidden_size": 8}) is None


def test_local_folder_sums_its_safetensors(llama_dir):
    disk = sum(p.stat().st_size for p in llama_dir.glob("*.safetensors"))
    as_stored = estimate_weights(str(llama_dir), dtype="float32")  # the tiny model is float32
    assert as_stored.bytes == disk and as_stored.source == "files"
    assert estimate_weights(str(llama_dir)).bytes == disk // 2  # loads in half precision


def test_hub_metadata_sizes_beat_the_config_dtype():
    w = estimate_weights("google/gemma-2-9b-it", **probes(GEMMA_9B, GEMMA_SHARDS))
    assert w.source == "hub" and w.bytes == sum(GEMMA_SHARDS.values())  # bf16 files stay bf16
    assert w.params == count_params(GEMMA_9B)


def test_config_alone_gives_params_times_bits_with_quantization_overhead():
    w = estimate_weights("mlx-community/gemma-2-9b-it-4bit", **probes(quantized(GEMMA_9B, 4)))
    assert w.source == "config" and w.bits == 4.5  # a 16-bit scale and bias per 64 weights
    assert w.bytes == pytest.approx(count_params(GEMMA_9B) * 4.5 / 8, rel=1e-6)
    assert estimate_weights("x/y", **probes(None)) is None


def test_unknown_size_is_not_a_failure():
    fit = check_fit("x/y", budget=MAC_16GB, **probes(None))
    assert fit.fits is None and fit.batch_size is None
    assert require_fit("x/y", budget=MAC_16GB, **probes(None)) == fit


def test_too_big_names_the_4bit_variant_on_a_16gb_mac():
    with pytest.raises(PertokenError) as e:
        require_fit("google/gemma-2-9b-it", budget=MAC_16GB, **probes(GEMMA_9B, GEMMA_SHARDS))
    msg = str(e.value)
    assert "\n" not in msg and "~18.5 GB" in msg and "Metal's recommended working set" in msg
    assert "--model mlx-community/gemma-2-9b-it-4bit (~5.2 GB)" in msg
    assert require_fit("mlx-community/gemma-2-9b-it-4bit", budget=MAC_16GB, **probes(
        quantized(GEMMA_9B, 4))).fits  # fmt: skip


def test_too_big_names_the_8bit_variant_when_it_leaves_room():
    with pytest.raises(PertokenError, match="--model mlx-community/Llama-3.1-8B-Instruct-8bit"):
        require_fit("meta-llama/Llama-3.1-8B-Instruct", budget=MAC_16GB, **probes(LLAMA_8B))


def test_an_8bit_model_too_big_suggests_its_4bit_sibling():
    cfg = quantized(GEMMA_9B, 8)
    with pytest.raises(PertokenError, match="--model mlx-community/gemma-2-9b-it-4bit "):
        require_fit("mlx-community/gemma-2-9b-it-8bit", budget=(9 * GB, "fake"), **probes(cfg))


def test_no_variant_fits_asks_for_a_smaller_model():
    budget = (4 * GB, "fake")
    with pytest.raises(PertokenError) as e:
        require_fit(
            "mlx-community/gemma-2-9b-it-4bit", budget=budget, **probes(quantized(GEMMA_9B, 4))
        )
    assert "choose a smaller model" in str(e.value) and "--model" not in str(e.value)


@pytest.mark.parametrize("budget", [MAC_16GB, MAC_32GB, (400 * GB, "big")])
def test_batch_size_is_what_the_left_memory_holds(budget):
    fit = check_fit(
        "mlx-community/gemma-2-9b-it-4bit", budget=budget, **probes(quantized(GEMMA_9B, 4))
    )
    n, left = fit.batch_size, fit.usable - fit.weights.bytes
    assert 1 <= n <= memory.MAX_BATCH and n * fit.per_slot <= left
    assert n == memory.MAX_BATCH or (n + 1) * fit.per_slot > left
    longer = check_fit(
        "mlx-community/gemma-2-9b-it-4bit",
        budget=budget,
        max_new_tokens=4000,
        **probes(quantized(GEMMA_9B, 4)),
    )
    assert longer.per_slot > fit.per_slot and longer.batch_size <= n


def test_offline_hub_is_not_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the hub was asked while HF_HUB_OFFLINE is set")

    monkeypatch.setattr(memory, "_hub_sizes", no_network)
    monkeypatch.setattr(machine, "hub_reachable", no_network)
    assert memory.repo_files("someone/some-model") is None
    assert memory.repo_config("someone/some-model") is None


def test_load_backend_fails_before_loading(monkeypatch, llama_dir):
    monkeypatch.setattr(machine, "mlx_budget", lambda: (1000, "fake"))

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(backends, "backend_class", never)
    with pytest.raises(PertokenError, match="MLX may use"):
        backends.load_backend(str(llama_dir), "mlx")
    monkeypatch.setattr(machine, "mlx_budget", lambda: (1000 * GB, "fake"))
    with pytest.raises(AssertionError, match="loaded"):
        backends.load_backend(str(llama_dir), "mlx")  # fits: goes on to load


def test_run_fails_in_seconds_with_one_line(monkeypatch, tmp_path, llama_dir):
    monkeypatch.setattr(machine, "mlx_budget", lambda: (1000, "fake"))
    monkeypatch.setattr(backends, "backend_class", pytest.fail)
    args = ["run", "--backend", "mlx", "--model", str(llama_dir), "--trait", "paternalism"]
    start = time.perf_counter()
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "runs")])
    assert time.perf_counter() - start < 10
    assert r.exit_code == 1
    error = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(llama_dir) in error[0] and "MLX may use" in error[0]
    assert not (tmp_path / "runs").exists()  # nothing started
