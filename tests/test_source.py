"""Locating a model: folders without a tokenizer, offline mode and an unreachable hub."""

import shutil
import socket

import huggingface_hub
import pytest
import transformers

from pertoken.backends import load_backend
from pertoken.backends.source import hub_reachable, locate
from pertoken.errors import PertokenError

NOT_CACHED = "pertoken-tests/not-a-cached-model"
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.mlx)]


def _need(backend: str) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch from the hub fails the test at once."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def cache_model(cache, repo: str, folder) -> None:
    """Lay `folder` out in the hub cache as the snapshot of `repo` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_folder_without_tokenizer_is_one_clear_line(backend, llama_dir, tmp_path):
    _need(backend)
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    with pytest.raises(PertokenError, match="has no tokenizer .*copy the tokenizer files"):
        load_backend(str(folder), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offline_and_not_cached_fails_at_once_with_the_hint(
    backend, hub_cache, no_downloads, monkeypatch
):
    _need(backend)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PertokenError, match="HF_HUB_OFFLINE is set: download it .*local folder"):
        load_backend(NOT_CACHED, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_hub_fails_at_once_with_the_hint(backend, hub_cache, no_downloads, monkeypatch):
    _need(backend)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert not hub_reachable()
    with pytest.raises(PertokenError, match=f"cannot reach the Hugging Face hub at {endpoint}"):
        load_backend(NOT_CACHED, backend)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_model_loads_without_the_hub(backend, offline, hub_cache, llama_dir, monkeypatch):
    _need(backend)
    cache_model(hub_cache, "pertoken-tests/tiny-llama", llama_dir)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert locate("pertoken-tests/tiny-llama").cache_only
    b = load_backend("pertoken-tests/tiny-llama", backend, dtype="float32", device="cpu")
    assert (b.model_id, b.n_layers) == ("pertoken-tests/tiny-llama", 4)


def test_a_path_that_is_not_there_is_not_looked_up(tmp_path, no_downloads):
    with pytest.raises(PertokenError, match="does not exist"):
        locate(str(tmp_path / "missing"))
    with pytest.raises(PertokenError, match="no config.json"):
        locate(str(tmp_path))


@pytest.mark.parametrize("offline", [True, False])
def test_the_download_hint_names_a_command_that_is_installed(
    hub_cache, no_downloads, monkeypatch, offline
):
    import os
    import shlex
    import sys

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(PertokenError) as e:
        locate(NOT_CACHED)
    hint = str(e.value).split("(", 1)[1].split(")")[0]
    tool = shlex.split(hint)[0]
    assert hint.startswith(f"{tool} download {NOT_CACHED} --local-dir")
    here = os.path.dirname(sys.executable)
    assert shutil.which(tool) or shutil.which(tool, path=here), f"{tool} is not installed"
