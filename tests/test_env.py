"""`pertoken env` and `pertoken env --json` on this machine: every field, never the key."""

import json
import os
import platform
from importlib import metadata

import pytest
from click.testing import CliRunner

from pertoken.backends import machine, memory
from pertoken.cli import main

SECRET = "sk-test-never-print-me-123"
FIELDS = {
    "os",
    "machine",
    "python",
    "versions",
    "backends",
    "auto",
    "defaults",
    "memory",
    "default_models",
    "hub",
    "judge_key",
}
LABELS = [
    "os",
    "machine",
    "python",
    "pertoken",
    "torch",
    "transformers",
    "mlx",
    "mlx-lm",
    "backends",
    "auto",
    "torch default",
    "mlx default",
    "memory",
    "mlx may use",
    "torch model",
    "mlx model",
    "hub",
    "judge key",
]


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No judge key, no .env, and a hub that is never really asked."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def env_json(*args) -> dict:
    r = CliRunner().invoke(main, ["env", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_text_lists_every_field_and_hides_the_key(clean, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(main, ["env"])
    assert r.exit_code == 0, r.output
    labels = [line.split("  ")[0] for line in r.output.splitlines()]
    assert labels == LABELS
    assert SECRET not in r.output and "OPENAI_API_KEY set (environment)" in r.output
    assert "offline (HF_HUB_OFFLINE is set" in r.output
    assert f"pertoken       {metadata.version('pertoken')}" in r.output


def test_json_lists_every_field(clean, monkeypatch):
    monkeypatch.setattr(machine, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(machine, "total_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(machine, "mlx_budget", lambda: (11_453_251_584, "Metal"))
    sizes = {"google/gemma-2-9b-it": 18_484_000_000, "mlx-community/gemma-2-9b-it-4bit": 5.2e9}
    monkeypatch.setattr(memory, "repo_files", lambda m: {"model.safetensors": int(sizes[m])})
    monkeypatch.setattr(memory, "repo_config", lambda m: None)
    r = env_json()
    assert set(r) == FIELDS
    assert r["machine"] == platform.machine() and r["python"].startswith(platform.python_version())
    assert set(r["versions"]) == {"pertoken", "torch", "transformers", "mlx", "mlx-lm"}
    assert r["versions"]["torch"] == metadata.version("torch")
    assert r["backends"] == {"torch": True, "mlx": True}  # both are installed here
    assert r["auto"]["backend"] == ("mlx" if machine.this_machine().apple_silicon else "torch")
    assert r["defaults"]["torch"] == {"device": "cpu", "dtype": "float32"}  # no CUDA here
    assert set(r["defaults"]["mlx"]) == {"device", "dtype"}
    mem = r["memory"]
    assert mem["total"] == 16 * 2**30 and mem["mlx_limit"] == 11_453_251_584
    assert mem["free"] is None or mem["free"] > 0
    models = r["default_models"]
    assert models["torch"]["model"] == "google/gemma-2-9b-it"
    assert models["mlx"]["model"] == "mlx-community/gemma-2-9b-it-4bit"
    assert models["torch"]["fits"] is False  # float32 on the CPU: ~37 GB in 16 GiB of RAM
    assert models["mlx"]["fits"] is True  # ~5.2 GB in Metal's 11.5 GB
    assert r["hub"] == {"endpoint": "https://huggingface.co", "offline": False, "reachable": True}
    assert r["judge_key"] == {"name": "OPENAI_API_KEY", "present": False, "where": None}


def test_judge_key_in_a_dotenv_file_is_found_not_shown_nor_loaded(clean, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (clean / ".env").write_text(f"OPENAI_API_KEY={SECRET}\n")
    r = CliRunner().invoke(main, ["env", "--json"])
    assert r.exit_code == 0 and SECRET not in r.output
    assert json.loads(r.output)["judge_key"]["where"] == ".env"
    assert "OPENAI_API_KEY" not in os.environ


def test_env_imports_no_framework_for_values_it_can_read_without_one():
    """Versions come from package metadata; torch is imported only where a CUDA device may
    exist, and neither transformers nor mlx-lm is ever needed."""
    import subprocess
    import sys

    from pertoken.backends.machine import may_have_cuda

    code = (
        "import sys; from pertoken.cli import main; sys.argv = ['pertoken', 'env']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('loaded', sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'mlx_lm'}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300).stdout  # fmt: skip
    loaded = out.strip().splitlines()[-1]
    assert loaded == ("loaded ['torch']" if may_have_cuda() else "loaded []"), out
    assert f"torch          {metadata.version('torch')}" in out
    assert f"transformers   {metadata.version('transformers')}" in out
