"""--ablate and --cap on the command line, and exports that stay add-only."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken import cli
from pertoken.backends import Steer
from pertoken.errors import PertokenError
from pertoken.pipeline.export import export_vector, import_vector
from pertoken.pipeline.steer import parse_ablate_spec, parse_cap_spec, parse_specs
from pertoken.vectors import PersonaVector, save_vector
from tests.reference import rand


def test_cap_and_ablate_specs_read_either_bound_and_a_stored_mean():
    cap = parse_cap_spec("C:/v.pt:12::4.5")
    assert (cap.path, cap.layer, cap.lo, cap.hi, cap.op) == ("C:/v.pt", 12, None, 4.5, "cap")
    assert (parse_cap_spec("v.pt:3:-1:").lo, parse_cap_spec("v.pt:3:-1:").hi) == (-1.0, None)
    assert parse_ablate_spec("v.pt:7").mean == 0.0
    mean = parse_ablate_spec("v.pt:7:1.25")
    assert (mean.path, mean.layer, mean.mean) == ("v.pt", 7, 1.25)
    ops = [s.op for s in parse_specs(["v.pt:2:1"], ["v.pt:2"], ["v.pt:2::1"])]
    assert ops == ["add", "ablate", "cap"]


@pytest.mark.parametrize(
    "parse, text, words",
    [
        (parse_cap_spec, "v.pt:12", "VECTOR.pt:LAYER:LO:HI"),
        (parse_cap_spec, "v.pt:12::", "VECTOR.pt:LAYER:LO:HI"),
        (parse_cap_spec, "v.pt:12:5:1", "below lo"),
        (parse_cap_spec, "v.pt:12:nan:", "finite"),
        (parse_ablate_spec, "v.pt:x", "VECTOR.pt:LAYER"),
    ],
)
def test_bad_specs_are_one_line(parse, text, words):
    with pytest.raises(PertokenError, match=words) as e:
        parse(text)
    assert "\n" not in str(e.value)


def _vec(tmp_path):
    data = np.stack([rand(i) for i in range(5)])  # [n_layers + 1, hidden] of the tiny llama
    return str(save_vector(PersonaVector(data), tmp_path / "v.pt"))


def test_cli_steer_caps_and_ablates(llama_dir, tmp_path):
    path = _vec(tmp_path)
    base = ["steer", "-m", str(llama_dir), "--backend", "torch", "--max-new-tokens", "6"]
    for extra in (["--cap", f"{path}:2::-3"], ["--ablate", f"{path}:2"]):
        res = CliRunner().invoke(cli.main, base + extra + ["hello"], env={"COLUMNS": "120"})
        assert res.exit_code == 0, res.output
        assert "cap v.pt layer 2 to [-inf, -3]" in res.output or "ablate v.pt layer 2" in res.output
    res = CliRunner().invoke(cli.main, base + ["--cap", f"{path}:2:4:1", "hello"])
    assert res.exit_code == 1 and "below lo" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.main, base + ["hello"])
    assert res.exit_code == 1 and "nothing to steer with" in res.output


def test_cli_refuses_a_coefficient_that_overflows(llama_dir, tmp_path):
    path = _vec(tmp_path)
    args = ["steer", "-m", str(llama_dir), "--backend", "torch", "--vector", path,
            "--layer", "2", "--coef", "1e39", "hi"]  # fmt: skip
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 1 and "overflows float32" in res.output and "!!!" not in res.output


def test_exports_stay_add_only(tmp_path):
    add = Steer.add(2, rand(0), 3.0).then(Steer.add(3, rand(1), -1.0))
    out = export_vector(add, out=tmp_path / "c.gguf", n_layers=4, model_hint="llama")
    back = import_vector(out.path, n_layers=4)
    np.testing.assert_allclose(back.data[2], 3.0 * rand(0), rtol=1e-6)
    np.testing.assert_allclose(back.data[3], -rand(1), rtol=1e-6)
    for bad in (Steer.cap(2, rand(0), hi=1.0), Steer.ablate(2, rand(0))):
        with pytest.raises(PertokenError, match="can only add"):
            export_vector(bad, out=tmp_path / "x.gguf", n_layers=4)
    assert not (tmp_path / "x.gguf").exists()


def test_eval_sweeps_cap_thresholds_like_coefficients(tmp_path):
    from tests.test_evaluate import FakeBackend, FakeJudge, sweep

    backend = FakeBackend()
    result = sweep(backend, tmp_path, FakeJudge(), coefs=(0, 2.5), op="cap")
    assert len(backend.calls) == 1  # the whole grid in one call, a steer per prompt
    caps = backend.calls[0][1]
    assert all(s is not None for s in caps)  # a cap at 0 still steers
    assert {(s.terms[0].op, s.terms[0].row, s.terms[0].hi) for s in caps} == {
        ("cap", L, hi) for L in (1, 3) for hi in (0.0, 2.5)
    }
    assert {(s.layer, s.coef) for s in result.summary} == {(L, c) for L in (1, 3) for c in (0, 2.5)}
    assert json.loads((tmp_path / "eval.json").read_text())["op"] == "cap"
    with pytest.raises(PertokenError, match="other"):  # an add sweep may not reuse the folder
        sweep(FakeBackend(), tmp_path, FakeJudge(), coefs=(0, 2.5))
