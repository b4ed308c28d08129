import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pertoken import cli
from pertoken.commands import options
from pertoken.errors import PertokenError
from pertoken.pipeline.options import Generation
from pertoken.pipeline.steer import (
    SteerSpec,
    build_steer,
    parse_steer_spec,
    side_by_side,
    steer_compare,
    zip_specs,
)
from pertoken.vectors import PersonaVector, save_vector
from tests.fake_backend import FakeBackend


@pytest.fixture
def vec_file(tmp_path):
    data = np.random.default_rng(5).normal(size=(5, 16)).astype(np.float32)
    return str(save_vector(PersonaVector(data), tmp_path / "trait_response_avg_diff.pt"))


def test_parse_steer_spec_keeps_colons_in_the_path():
    assert parse_steer_spec("C:/v/x.pt:16:-1.5") == SteerSpec("C:/v/x.pt", 16, -1.5)
    with pytest.raises(PertokenError, match="VECTOR.pt:LAYER:COEF"):
        parse_steer_spec("x.pt:16")
    with pytest.raises(PertokenError, match="VECTOR.pt:LAYER:COEF"):
        parse_steer_spec("x.pt:a:1")


def test_zip_specs_needs_matching_counts():
    assert zip_specs(["a.pt", "b.pt"], [1, 2], [0.5, -1]) == [
        SteerSpec("a.pt", 1, 0.5),
        SteerSpec("b.pt", 2, -1.0),
    ]
    with pytest.raises(PertokenError, match="2 --vector, 1 --layer and 2 --coef"):
        zip_specs(["a.pt", "b.pt"], [1], [0.5, 1])


def test_build_steer_sums_terms_and_rejects_other_models(vec_file, tmp_path):
    fake = FakeBackend()
    st = build_steer(
        fake, [SteerSpec(vec_file, 2, 1.0), SteerSpec(vec_file, 2, 2.0)], positions="response"
    )
    data = torch.load(vec_file, weights_only=True).numpy()
    np.testing.assert_allclose(st.by_row()[2], 3.0 * data[2], rtol=1e-6)
    assert st.positions == "response"
    small = save_vector(PersonaVector(np.ones((5, 8), np.float32)), tmp_path / "small.pt")
    with pytest.raises(PertokenError, match="another model"):
        build_steer(fake, [SteerSpec(str(small), 2, 1.0)])
    torch.save(torch.ones(16), tmp_path / "flat.pt")
    with pytest.raises(PertokenError, match=r"not a \[n_layers\+1, hidden\] tensor"):
        build_steer(fake, [SteerSpec(str(tmp_path / "flat.pt"), 2, 1.0)])
    with pytest.raises(PertokenError, match="outside 1..4"):
        build_steer(fake, [SteerSpec(vec_file, 0, 1.0)])


def test_coef_zero_equals_unsteered_and_a_strong_coef_changes_the_answer(vec_file):
    fake = FakeBackend()
    zero = steer_compare(
        fake,
        "hello",
        build_steer(fake, [SteerSpec(vec_file, 2, 0.0)]),
        Generation(max_tokens=15, temperature=1.0, seed=4),
    )
    assert zero.steered == zero.unsteered
    strong = steer_compare(
        fake, "hello", build_steer(fake, [SteerSpec(vec_file, 2, 8.0)]), Generation(max_tokens=15)
    )
    assert strong.steered != strong.unsteered
    assert strong.chat_prompt == fake.chat_prompt(None, "hello")


def test_side_by_side_columns_and_narrow_fallback():
    out = side_by_side("left text " * 10, "right", width=81).splitlines()
    assert out[0].startswith("unsteered") and "| steered" in out[0]
    assert all(len(line) <= 81 for line in out) and len(out) > 3
    narrow = side_by_side("a", "b", width=40)
    assert narrow == "--- unsteered ---\na\n\n--- steered ---\nb"


def test_cli_steer_prints_both_answers(vec_file, monkeypatch):
    fake = FakeBackend()
    monkeypatch.setattr(options, "load_model", lambda *a: fake)
    args = [
        "steer",
        "-m",
        "x",
        "--vector",
        vec_file,
        "--layer",
        "2",
        "--coef",
        "8",
        "--max-new-tokens",
        "10",
        "hello",
    ]
    res = CliRunner().invoke(cli.main, args, env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    plain = fake.generate([fake.chat_prompt(None, "hello")], max_new_tokens=10, temperature=0)[0]
    assert "trait_response_avg_diff.pt layer 2 coef 8" in res.output
    assert plain.strip() in res.output
    res = CliRunner().invoke(cli.main, args[:9] + ["--layer", "3", "hi"])
    assert res.exit_code == 1 and "1 --vector, 2 --layer and 1 --coef" in res.output


# ---------------------------------------------------------------- the torch backend, tiny models
@pytest.fixture(scope="module")
def tiny(model_dir):
    from pertoken.backends import load_backend

    return load_backend(str(model_dir), "torch", dtype="float32", device="cpu")


def _tiny_vec(tmp_path, seed=6):
    data = np.random.default_rng(seed).normal(size=(5, 64)).astype(np.float32)
    return str(save_vector(PersonaVector(data), tmp_path / "v.pt"))


@pytest.mark.parametrize("positions", ["all", "response"])
def test_torch_coef_zero_is_unsteered_and_a_strong_coef_is_not(tiny, tmp_path, positions):
    path = _tiny_vec(tmp_path)
    kw = dict(max_new_tokens=8, temperature=1.0, seed=2)
    gen = Generation(max_tokens=8, temperature=1.0, seed=2)
    zero = steer_compare(
        tiny, "hi", build_steer(tiny, [SteerSpec(path, 2, 0.0)], positions=positions), gen
    )
    assert zero.steered == zero.unsteered
    strong = build_steer(
        tiny, [SteerSpec(path, 2, 6.0), SteerSpec(path, 3, -6.0)], positions=positions
    )
    res = steer_compare(tiny, "hi", strong, gen)
    assert res.steered != res.unsteered
    assert res.unsteered == tiny.generate([res.chat_prompt], **kw)[0]


def test_torch_cli_steer(llama_dir, tmp_path):
    path = _tiny_vec(tmp_path)
    args = [
        "steer",
        "-m",
        str(llama_dir),
        "--backend",
        "torch",
        "--vector",
        path,
        "--layer",
        "2",
        "--coef",
        "0",
        "--max-new-tokens",
        "6",
        "--system",
        "Be brief.",
        "hello",
    ]
    res = CliRunner().invoke(cli.main, args, env={"COLUMNS": "60"})  # stacked
    assert res.exit_code == 0, res.output
    blocks = res.output.split("--- steered ---\n")
    assert blocks[0].split("--- unsteered ---\n")[1].strip() == blocks[1].strip()
    res = CliRunner().invoke(cli.main, args[:7] + ["--layer", "9"] + args[9:])
    assert res.exit_code == 1 and "layer 9 is outside 0..4" in res.output
