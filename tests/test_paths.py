"""Names that become paths: trait names and model paths never lead outside the output folder."""

import json
import os

import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.paths import inside, model_basename, path_name
from pertoken.pipeline.extract import vector_paths
from pertoken.pipeline.run import run_folder
from tests.small_kit import kit_dict


@pytest.mark.parametrize(
    "name", ["../../../escaped", "/tmp/escaped", "..", ".", "", "a/b", "a\\b", "nul\0l"]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(PertokenError, match="cannot name a file or folder"):
        path_name(name, "trait name")


def test_plain_names_pass():
    for name in ("evil", "paternalism", "evil.v2", "Évil trait"):
        assert path_name(name) == name


def test_model_basename_never_escapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_basename("google/gemma-2-9b-it") == "gemma-2-9b-it"
    assert model_basename("mlx-community/gemma-2-9b-it-4bit/") == "gemma-2-9b-it-4bit"
    assert model_basename("models/tiny/..") == "models"
    assert model_basename("models/tiny/../") == "models"
    assert model_basename("..") == tmp_path.parent.name
    assert model_basename("/") == "model"
    for model in ("models/tiny/..", "../..", "/", "./"):
        folder = run_folder("runs", model, "evil")
        assert os.path.commonpath([os.path.abspath("runs"), os.path.abspath(folder)]) == str(
            tmp_path / "runs"
        )


def test_run_folder_and_vector_paths_refuse_unsafe_traits(tmp_path):
    with pytest.raises(PertokenError, match="trait name '../x'"):
        run_folder(tmp_path, "m", "../x")
    with pytest.raises(PertokenError, match="trait name '/abs'"):
        vector_paths(tmp_path, "/abs")
    assert inside(tmp_path, "a.csv") == tmp_path / "a.csv"


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/pertoken-escaped-run"])
def test_cli_run_with_an_escaping_kit_name_writes_nothing(tmp_path, name):
    kit = kit_dict("evil")
    kit["name"] = name
    path = tmp_path / "kits" / "evil.json"
    path.parent.mkdir()
    path.write_text(json.dumps(kit))
    out = tmp_path / "a" / "b" / "runs"
    args = ["run", "--model", "org/model", "--trait", str(path), "--out", str(out),
            "--base-url", "http://127.0.0.1:9/v1"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "key 'name'" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.json", "kits"]
    assert not os.path.exists("/tmp/pertoken-escaped-run")


def test_cli_extract_refuses_an_escaping_trait(tmp_path):
    args = ["extract", "--model", "m", "--pos", "p.csv", "--neg", "n.csv",
            "--trait", "../../x", "--save-dir", str(tmp_path / "v")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "trait name '../../x'" in r.output
    assert not (tmp_path / "v").exists()
