"""Sampling on both backends: at least one answer token, and `--sampler model` applying the
checkpoint's generation_config as transformers' `generate` does."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pertoken.backends import Steer, load_backend
from pertoken.backends.sampler import sampling_options
from pertoken.cli import main
from pertoken.pipeline.generate import generate_csv
from pertoken.pipeline.options import Generation
from pertoken.pipeline.steer import steer_compare
from pertoken.traits import load_trait
from tests.pipeline_fakes import RecordingBackend
from tests.reference import chat_prompts, stop_ids, stopping_at
from tests.small_kit import write_kit

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.mlx)]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, llama_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm")
    return load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def on_numpy(backend, name: str):
    """The backend's sampling function `name`, taking and returning numpy arrays."""
    if backend.name == "torch":
        from pertoken.backends.torch import sampling

        def run(x, *args):
            args = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
            return getattr(sampling, name)(torch.from_numpy(x), *args).numpy()

        return run
    import mlx.core as mx

    from pertoken.backends.mlx import sampling

    def run(x, *args):
        if name == "penalize":  # top_k and top_p take their per-slot settings in numpy
            args = [mx.array(a) if isinstance(a, np.ndarray) else a for a in args]
        return np.array(getattr(sampling, name)(mx.array(x), *args))

    return run


def test_first_token_is_never_a_stop_token(backend):
    p = chat_prompts(backend)[0]
    first = backend.trace(p, rows=[1], max_new_tokens=4).token_ids[0]
    # the greedy first token becomes a stop token: the answer is another token, not empty
    stopper = stopping_at(backend, stop_ids(backend) | {first})
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        assert stopper.generate([p], max_new_tokens=4, **kw)[0] != ""
    traced = stopper.trace(p, rows=[1], max_new_tokens=4)
    assert traced.token_ids and traced.token_ids[0] != first


def test_top_k_one_is_greedy(backend):
    ps = chat_prompts(backend)
    greedy = backend.generate(ps, max_new_tokens=10, temperature=0)
    for seed in (0, 1):
        assert backend.generate(ps, max_new_tokens=10, temperature=2.0, top_k=1, seed=seed) == (
            greedy
        )
    assert backend.generate(ps, max_new_tokens=10, temperature=2.0, seed=0) != greedy


def test_a_temperature_that_underflows_is_greedy(backend):
    ps = chat_prompts(backend)
    greedy = backend.generate(ps, max_new_tokens=8, temperature=0)
    for t in (1e-300, 1e-45, 1e-38):  # logits / t is not finite in float32
        for seed in (0, 1):
            got = backend.generate(ps, max_new_tokens=8, temperature=t, seed=seed)
            assert got == greedy, t


def test_each_setting_matches_transformers_processors(backend):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 50)) * 3).astype(np.float32)  # [B, vocab]
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary
    ids = rng.integers(0, 50, (3, 7))  # tokens seen so far
    seen = np.zeros((3, 50), dtype=bool)
    np.put_along_axis(seen, ids, True, axis=1)

    def hf(processor):
        return processor(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()

    want = hf(RepetitionPenaltyLogitsProcessor(1.3))
    assert not np.allclose(want, logits)
    np.testing.assert_allclose(on_numpy(backend, "penalize")(logits, seen, 1.3), want, rtol=1e-6)
    for k in (1, 5):
        got = on_numpy(backend, "top_k")(logits, np.full(3, k))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(hf(TopKLogitsWarper(k))))
    for p in (0.3, 0.8):
        got = on_numpy(backend, "top_p")(logits, np.full(3, p, np.float32))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(hf(TopPLogitsWarper(p))))


def test_repetition_penalty_matches_transformers_generate(backend, hf_llama):
    p = chat_prompts(backend)[1]
    ids = torch.tensor([backend.encode(p)])
    eos = hf_llama.generation_config.eos_token_id
    out = hf_llama.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=1,
        do_sample=False, repetition_penalty=1.5, eos_token_id=eos,
    )  # fmt: skip
    want = out[0, ids.shape[1] :].tolist()
    stops = set(backend.stop_ids.tolist()) if backend.name == "torch" else backend.stop
    want = want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
    got = backend.generate([p], max_new_tokens=16, temperature=0, repetition_penalty=1.5)[0]
    assert got == backend.decode(want)
    assert got != backend.generate([p], max_new_tokens=16, temperature=0)[0]


def test_sampler_model_reads_the_generation_config():
    fake = RecordingBackend()
    assert sampling_options(fake, "plain", None, default=1.0) == {"temperature": 1.0}
    assert sampling_options(fake, "plain", 0.3) == {"temperature": 0.3}
    # nothing set: transformers' defaults, greedy since do_sample is off
    assert sampling_options(fake, "model", None) == dict(
        temperature=0.0, top_k=50, top_p=1.0, repetition_penalty=1.0
    )
    fake.generation_config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None}
    fake.generation_config |= {"repetition_penalty": 1.1, "eos_token_id": [1, 2]}
    assert sampling_options(fake, "model", None) == dict(
        temperature=0.6, top_k=50, top_p=0.9, repetition_penalty=1.1
    )
    assert sampling_options(fake, "model", 1.2)["temperature"] == 1.2  # the user's wins


def test_generate_stage_passes_the_model_sampler(tmp_path):
    fake = RecordingBackend()
    fake.generation_config = {"do_sample": True, "temperature": 0.7, "top_k": 20}
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    out = tmp_path / "pos.csv"
    generate_csv(fake, load_trait(str(kit)), out, Generation(samples=2, sampler="model"))
    assert {(c["temperature"], c["top_k"], c["top_p"]) for c in fake.generate_calls} == {
        (0.7, 20, 1.0)
    }


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", BACKENDS)
def test_cli_sampler_model_follows_the_checkpoint(name, llama_dir, tmp_path):
    if name == "mlx":
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm")
    folder = tmp_path / "top-k-one"
    shutil.copytree(llama_dir, folder)
    # a checkpoint that samples hot but keeps only its top token: greedy in effect
    config = {"do_sample": True, "temperature": 5.0, "top_k": 1}
    (folder / "generation_config.json").write_text(json.dumps(config))
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    args = ["generate", "--model", str(folder), "--backend", name, "--trait", str(kit)]
    args += ["--n-per-question", "3", "--max-new-tokens", "6"]
    rows = {}
    for sampler in ("model", "plain"):
        out = tmp_path / f"{sampler}.csv"
        r = CliRunner().invoke(main, [*args, "--sampler", sampler, "--out", str(out)])
        assert r.exit_code == 0, r.output
        rows[sampler] = csv_rows(out)
    b = load_backend(str(folder), name, dtype="float32", device="cpu")
    greedy = b.generate([rows["model"][0]["prompt"]], max_new_tokens=6, temperature=0)[0]
    assert [r["answer"] for r in rows["model"]] == [greedy] * 3
    assert [r["answer"] for r in rows["plain"]] != [greedy] * 3  # plain samples at 1.0


def test_steer_uses_the_model_sampler():
    fake = RecordingBackend()
    fake.generation_config = {"top_k": 3, "repetition_penalty": 1.2}
    steer_compare(fake, "hi", Steer.single(1, np.ones(16), 1.0), Generation(sampler="model"))
    used = [(c["temperature"], c["top_k"], c["repetition_penalty"]) for c in fake.generate_calls]
    assert used == [(0.0, 3, 1.2)] * 2  # greedy: the config does not set do_sample
