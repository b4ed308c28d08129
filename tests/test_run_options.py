"""The option objects (pipeline/options.py) and the path of each flag from the command line
into them: built once by the command, passed whole, and the greedy rule written once."""

import dataclasses

import click
import numpy as np
import pytest
from click.testing import CliRunner

import pertoken.pipeline.generate
from pertoken.cli import main
from pertoken.commands import options
from pertoken.pipeline.options import (
    Extraction,
    Generation,
    JudgeSettings,
    ModelChoice,
    flat_names,
    from_flat,
)
from pertoken.pipeline.sweep.plan import RUN_KEYS
from pertoken.vectors import PersonaVector, save_vector
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import write_kit

CONFIG = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9}


class Configured(RecordingBackend):
    generation_config = CONFIG


def test_the_greedy_rule():
    b = RecordingBackend()
    assert Generation(samples=1).keywords(b)["temperature"] == 0.0  # one sample: greedy
    assert Generation(samples=2).keywords(b)["temperature"] == 1.0
    assert Generation(samples=2).keywords(b, default=0.0)["temperature"] == 0.0  # steer's
    assert Generation(samples=1, temperature=0.7).keywords(b)["temperature"] == 0.7
    model = Generation(samples=2, sampler="model", seed=3, max_tokens=9).keywords(Configured())
    assert model == dict(max_new_tokens=9, seed=3, temperature=0.6, top_k=20, top_p=0.9,
                         repetition_penalty=1.0)  # fmt: skip
    s = Generation(samples=2, sampler="model", seed=3).sampling(Configured())
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.sampler) == (0.6, 20, 0.9, 3, "plain")


def test_the_objects_are_frozen_and_built_from_flat_names():
    g = from_flat(Generation, {"n_per_question": 3, "max_new_tokens": 5, "judge_model": "x"})
    assert (g.samples, g.max_tokens, g.temperature) == (3, 5, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.samples = 4
    j = from_flat(JudgeSettings, {"max_consecutive_failures": 2, "base_url": "http://h/v1"})
    assert (j.max_failures, j.base_url, j.concurrency) == (2, "http://h/v1", 32)
    m = from_flat(ModelChoice, {"dtype": "float32", "compile": True}, model="org/m")
    assert m == ModelChoice("org/m", dtype="float32", compile=True)
    assert from_flat(Extraction, {"threshold": 60, "method": "probe"}) == Extraction(60, "probe")
    # a plan's [run] table takes the same names as `pertoken run`, the model aside
    assert set(RUN_KEYS) == set(flat_names()) - {"model"}


def test_gather_hands_the_command_built_objects():
    seen = {}

    @click.command()
    @options.model_options()
    @options.judge_options
    @click.option("--n-per-question", default=10)
    @click.option("--temperature", type=float, default=None)
    @options.gather(choice=ModelChoice, generation=Generation, judging=JudgeSettings)
    def cmd(**kw):
        seen.update(kw)

    r = CliRunner().invoke(cmd, ["-m", "org/m", "--dtype", "float16", "--n-per-question", "2",
                                 "--temperature", "0.5", "--judge", "local:x"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert set(seen) == {"choice", "generation", "judging"}  # nothing travels loose
    assert seen["choice"] == ModelChoice("org/m", dtype="float16")
    assert seen["generation"] == Generation(samples=2, temperature=0.5)
    assert seen["judging"] == JudgeSettings("local:x")


def test_generate_flags_reach_generate_csv(tmp_path, monkeypatch):
    seen = {}

    def generate_csv(backend, trait, out, generation, **kw):
        seen.update(kw, generation=generation)
        return pertoken.pipeline.generate.GenerateResult(out, 0, 0, 0.0)

    monkeypatch.setattr(pertoken.pipeline.generate, "generate_csv", generate_csv)
    monkeypatch.setattr(options, "load_model", lambda choice: RecordingBackend())
    kit = write_kit(tmp_path, "evil", n_questions=1, n_instructions=1)
    args = ["generate", "-m", "org/fake", "--backend", "torch", "--trait", str(kit), "--eval",
            "--out", str(tmp_path / "e.csv"), "--n-per-question", "3", "--temperature", "0.4",
            "--sampler", "model", "--seed", "9", "--max-new-tokens", "7",
            "--batch-size", "2"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert seen["generation"] == Generation(3, 7, 0.4, "model", 9, 2)
    assert seen["polarity"] == "eval" and seen["pool"] is None


def test_steer_flags_reach_the_sampler(tmp_path, monkeypatch):
    backend = Configured()
    monkeypatch.setattr(options, "load_model", lambda choice: backend)
    vec = save_vector(PersonaVector(np.ones((5, 16), np.float32)), tmp_path / "v.pt")
    args = ["steer", "-m", "x", "--vector", str(vec), "--layer", "2", "--coef", "1",
            "--max-new-tokens", "4", "hi"]  # fmt: skip
    for flags, want in [
        ([], (0.0, 0, 0)),  # greedy by default
        (["--temperature", "0.8", "--seed", "5"], (0.8, 0, 5)),
        (["--sampler", "model"], (0.6, 20, 0)),  # the checkpoint's, as it samples
    ]:
        backend.generate_calls.clear()
        r = CliRunner().invoke(main, [*args, *flags])
        assert r.exit_code == 0, r.output
        got = {(c["temperature"], c["top_k"], c["seed"]) for c in backend.generate_calls}
        assert got == {want} and len(backend.generate_calls) == 2  # unsteered and steered
