"""Damaged vectors and coefficients, all-zero rows and the default steered positions."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pertoken import cli
from pertoken.backends.base import Steer, SteerTerm
from pertoken.commands import options
from pertoken.errors import PertokenError
from pertoken.pipeline.monitor import Monitoring, monitor
from pertoken.pipeline.steer import SteerSpec, build_steer, parse_steer_spec, zip_specs
from pertoken.pipeline.sweep.grid import parse_coefs
from pertoken.vectors import PersonaVector, load_vector, save_vector
from tests.fake_backend import FakeBackend
from tests.small_kit import write_kit

N_LAYERS, HIDDEN = 4, 16  # the fake backend's size


def run(*args):
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture
def fake(monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(options, "load_model", lambda *a: backend)
    return backend


@pytest.fixture
def vec_file(tmp_path):
    data = np.random.default_rng(2).normal(size=(N_LAYERS + 1, HIDDEN)).astype(np.float32)
    return save_vector(PersonaVector(data), tmp_path / "v.pt")


# ---------------------------------------------------------------- damaged vector files
@pytest.mark.parametrize("shape", [(0, HIDDEN), (1, HIDDEN), (N_LAYERS + 1, 0)])
def test_empty_vector_is_one_line_not_a_struct_error(tmp_path, shape):
    torch.save(torch.zeros(shape), tmp_path / "empty.pt")
    with pytest.raises(PertokenError, match=r"not a \[n_layers\+1, hidden\] tensor"):
        load_vector(tmp_path / "empty.pt")
    code, out = run("export", tmp_path / "empty.pt", "--out", tmp_path / "e.gguf")
    assert code == 1 and out.startswith("error:") and out.count("\n") == 1
    assert "n_layers+1, hidden" in out and not (tmp_path / "e.gguf").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_values_are_refused_naming_the_row(tmp_path, bad):
    data = torch.ones(N_LAYERS + 1, HIDDEN)
    data[3, 5] = bad
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(
        PertokenError, match=r"bad\.pt holds 1 NaN or infinite values \(first at row 3\)"
    ):
        load_vector(tmp_path / "bad.pt")
    code, out = run("export", tmp_path / "bad.pt", "--out", tmp_path / "b.gguf")
    assert code == 1 and "NaN or infinite" in out


def test_complex_values_are_refused(tmp_path):
    torch.save(torch.ones(N_LAYERS + 1, HIDDEN, dtype=torch.complex64), tmp_path / "c.pt")
    with pytest.raises(PertokenError, match="complex values"):
        load_vector(tmp_path / "c.pt")


# ---------------------------------------------------------------- coefficients
@pytest.mark.parametrize("coef", ["nan", "inf", "-inf"])
def test_nan_or_inf_coef_is_refused_everywhere(coef, vec_file):
    c = float(coef)
    with pytest.raises(PertokenError, match="not a finite number"):
        zip_specs([str(vec_file)], [2], [c])
    with pytest.raises(PertokenError, match="not a finite number"):
        parse_steer_spec(f"{vec_file}:2:{coef}")
    with pytest.raises(PertokenError, match="not a finite number"):
        parse_coefs(f"0,1,{coef}")
    with pytest.raises(PertokenError, match="not a finite number"):
        Steer.single(2, np.ones(HIDDEN), c)
    with pytest.raises(PertokenError, match="not a finite number"):
        SteerTerm(2, np.ones(HIDDEN, np.float32), c)


def test_cli_nan_coef_is_one_line_before_any_answer(fake, vec_file):
    code, out = run("steer", "-m", "x", "--vector", vec_file, "--layer", 2, "--coef", "nan", "hi")
    assert code == 1 and out == "error: steering coefficient nan is not a finite number: " + (
        "pass a number such as 2 or -1.5\n"
    )
    assert fake.calls == []
    code, out = run(
        "monitor",
        "-m",
        "x",
        "--vector",
        vec_file,
        "--layers",
        2,
        "--steer",
        f"{vec_file}:2:inf",
        "hi",
    )
    assert code == 1 and "not a finite number" in out


def test_a_steering_direction_with_nan_is_refused():
    v = np.ones(HIDDEN, np.float32)
    v[0] = np.nan
    with pytest.raises(PertokenError, match="steering vector at layer 2 holds 1 NaN"):
        Steer.single(2, v, 1.0)


# ---------------------------------------------------------------- all-zero rows
@pytest.fixture
def holey(tmp_path):
    """A vector whose row 2 is all zeros (as a file holding only some layers leaves it)."""
    data = np.random.default_rng(4).normal(size=(N_LAYERS + 1, HIDDEN)).astype(np.float32)
    data[2] = 0
    return save_vector(PersonaVector(data), tmp_path / "holey.pt")


def test_steer_refuses_an_all_zero_row_as_monitor_does(fake, holey, tmp_path):
    with pytest.raises(PertokenError, match=r"holey\.pt is all zeros at layer 2"):
        build_steer(fake, [SteerSpec(str(holey), 3, 1.0), SteerSpec(str(holey), 2, 1.0)])
    build_steer(fake, [SteerSpec(str(holey), 3, 1.0)])  # other rows steer as usual
    code, out = run("steer", "-m", "x", "--vector", holey, "--layer", 2, "--coef", 4, "hi")
    assert code == 1 and out.count("\n") == 1 and "is all zeros at layer 2" in out
    vec = load_vector(holey)
    with pytest.raises(PertokenError, match=r"vector 'h' is all zeros at layer 2: .*pick another"):
        monitor(
            fake,
            prompts=["hi"],
            vectors={"h": vec},
            layers=[3, 2],
            how=Monitoring(out_dir=tmp_path),
        )
    code, out = run("monitor", "-m", "x", "--vector", holey, "--layers", 2, "hi")
    assert code == 1 and "is all zeros at layer 2" in out


def test_eval_refuses_an_all_zero_row_before_generating(fake, holey, tmp_path):
    kit = write_kit(tmp_path, "evil")
    args = ["eval", "-m", "x", "--trait", kit, "--vector", holey, "--layers", 2]
    code, out = run(*args, "--out", tmp_path / "sweep", "--judge", "local:x")
    assert code == 1 and "is all zeros at layer 2" in out
    assert not (tmp_path / "sweep" / "answers.csv").exists()


# ---------------------------------------------------------------- positions
def test_positions_default_to_response_everywhere(fake, vec_file, tmp_path):
    for name in ("steer", "monitor", "eval"):
        (opt,) = [p for p in cli.main.commands[name].params if p.name == "positions"]
        assert opt.default == "response", name
    assert build_steer(fake, [SteerSpec(str(vec_file), 2, 1.0)]).positions == "response"
    code, out = run(
        "steer",
        "-m",
        "x",
        "--vector",
        vec_file,
        "--layer",
        2,
        "--coef",
        4,
        "--max-new-tokens",
        5,
        "hi",
    )
    assert code == 0 and "(positions response)" in out
    code, out = run(
        "monitor",
        "-m",
        "x",
        "--vector",
        vec_file,
        "--layers",
        2,
        "--out",
        tmp_path,
        "--steer",
        f"{vec_file}:2:4",
        "--max-new-tokens",
        5,
        "hi",
    )
    assert code == 0, out
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["steer"]["positions"] == "response"
