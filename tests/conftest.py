import os

import pytest

from tests.tiny_models import build_gemma2, build_llama, build_qwen2


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory):
    return build_gemma2(tmp_path_factory.mktemp("models") / "tiny-gemma2")


@pytest.fixture(scope="session", params=["llama", "gemma2"])
def model_dir(request, llama_dir, gemma_dir):
    return {"llama": llama_dir, "gemma2": gemma_dir}[request.param]


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return build_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture
def torch_one_thread():
    """torch on one thread: a tiny model gains nothing from threads on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_judge_cache(tmp_path, monkeypatch):
    """Each test judges with its own cache, never the user's ~/.cache/pertoken."""
    monkeypatch.setenv("PERTOKEN_CACHE_DIR", str(tmp_path / "judge-cache"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (start-up takes seconds and memory): two
    CPUs, every port on loopback, a small object store, workers' output kept out of the log."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: ray_runtime sets it up
        pytest.skip("the ray extra is not installed")
    from pertoken.pipeline.distributed import ray_runtime

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # no worker killed for memory that the other processes of a shared machine use
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    small = dict(object_store_memory=100 * 2**20, log_to_driver=False)
    with ray_runtime("local", num_cpus=2, **small) as ray:
        yield ray
