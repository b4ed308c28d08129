"""Ray for the data-parallel stages and sweeps: the runtime, and a pool of model actors.

A stage cuts its work into shards and hands `map_shards` a function `fn(backend, shard)`.
Without a pool the shards run here, in order, on the stage's own backend; with a `ModelPool`
they run on Ray actors that each loaded the model once (on their own GPUs, or CPUs), and the
results come back to the driver as they finish; the driver alone writes files, so outputs
are the same folders a single process writes, and a rerun resumes from them.

Ray is optional (`pip install "pertoken[ray]"`); nothing here imports it until it is used.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pertoken.backends.chat import ChatText
from pertoken.errors import PertokenError
from pertoken.pipeline.options import ModelChoice

INSTALL = 'pip install "pertoken[ray]"'
DEPTH = 2  # shards queued per actor
# Forwarded to every task and actor through Ray's runtime environment (never a file).
WORKER_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PERTOKEN_CACHE_DIR", "HF_TOKEN",
              "HF_HUB_OFFLINE")  # fmt: skip
_LOCAL_ENV = {
    # one machine: the local runtime binds every port to loopback, and reports nothing
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def require_ray():
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PertokenError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@contextmanager
def ray_runtime(address: str, *, num_cpus: int | None = None, **local):
    """Ray, connected for this block: `local` starts a runtime on this machine (num_cpus,
    default all; other `ray.init` options in `local`), `auto` joins the cluster at
    RAY_ADDRESS, anything else is that address. A runtime already connected (a notebook, a
    test session) is used as it is."""
    if address == "local":
        for k, v in _LOCAL_ENV.items():
            os.environ.setdefault(k, v)  # read when ray is first imported
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        raise PertokenError(
            "--ray auto joins the cluster at RAY_ADDRESS, which is not set: export the address "
            "`ray start --head` printed, give it as --ray ADDRESS, or use --ray local"
        )
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    opts = dict(num_cpus=num_cpus, include_dashboard=False, **local) if address == "local" else {}
    try:
        ray.init(address=address, logging_level="WARNING", **opts)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise PertokenError(f"cannot connect to Ray at {address!r}: {e}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_env() -> dict[str, str]:
    """The variables tasks and actors need from this process: the judge's key (from the
    environment or a .env file), its server, the score cache, Hugging Face access."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU-only one)."""
    return float(require_ray().cluster_resources().get("GPU", 0))


def unwrap(e: Exception) -> Exception:
    """A task's own PertokenError as it was raised; other Ray failures as one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, PertokenError):
        return cause
    ray = require_ray()
    if isinstance(e, ray.exceptions.RayTaskError):
        return PertokenError(f"a Ray worker failed: {type(cause).__name__}: {cause}")
    return PertokenError(f"a Ray worker was lost ({type(e).__name__}): rerun to resume")


@dataclass
class ModelInfo(ChatText):
    """A model the driver does not load, as its actors describe it: enough for the checks and
    settings records, and its tokenizer for prompts and token counts (ChatText)."""

    model_id: str
    name: str
    dtype: str
    device: str
    n_layers: int
    hidden_size: int
    generation_config: dict
    tokenizer: object = None  # None when it cannot be sent (then prompts are the actors')

    @classmethod
    def of(cls, backend) -> ModelInfo:
        keys = ("model_id", "name", "dtype", "device", "n_layers", "hidden_size")
        info = {k: getattr(backend, k) for k in keys}
        config = dict(getattr(backend, "generation_config", {}) or {})
        return cls(**info, generation_config=config, tokenizer=_sendable(backend))


def _sendable(backend):
    tokenizer = getattr(backend, "tokenizer", None)
    try:
        pickle.dumps(tokenizer)
    except Exception:  # a wrapper holding native handles
        return None
    return tokenizer


class _ModelWorker:
    """One Ray actor: loads the model once, then runs shards on it."""

    def __init__(self, spec: ModelChoice):
        self.backend = spec.load()

    def info(self) -> ModelInfo:
        return ModelInfo.of(self.backend)

    def run(self, fn: Callable, index: int, shard):
        return index, fn(self.backend, shard)


class ModelPool:
    """`workers` Ray actors holding `spec`'s model, each asking for `gpus` GPUs (0: CPU)."""

    def __init__(self, spec: ModelChoice, workers: int, *, gpus: float = 0, cpus: float = 1):
        ray = require_ray()
        if workers < 1:
            raise PertokenError(f"--workers must be at least 1, not {workers}")
        have = ray.cluster_resources()
        cpu, gpu = have.get("CPU", 0), have.get("GPU", 0)
        if workers * cpus > cpu or workers * gpus > gpu:
            raise PertokenError(
                f"{workers} workers of {cpus:g} CPU and {gpus:g} GPUs each do not fit in this "
                f"Ray cluster ({cpu:g} CPUs, {gpu:g} GPUs): give fewer --workers"
            )
        env = {"env_vars": worker_env()}
        cls = ray.remote(_ModelWorker).options(num_gpus=gpus, num_cpus=cpus, runtime_env=env)
        self.actors = [cls.remote(spec) for _ in range(workers)]

    @property
    def size(self) -> int:
        return len(self.actors)

    def info(self) -> ModelInfo:
        return self._get(self.actors[0].info.remote())

    def map(self, fn: Callable, shards: list) -> Iterator[tuple[int, object]]:
        """(index, fn(backend, shard)) as each shard finishes. Each actor has DEPTH shards
        queued, so it starts the next while the driver writes the last one's results."""
        ray = require_ray()
        fn_ref = ray.put(fn)  # shipped once, not with every shard
        todo = list(enumerate(shards))[::-1]
        running = {}  # ObjectRef -> actor
        for actor in self.actors * DEPTH:
            if todo:
                running[actor.run.remote(fn_ref, *todo.pop())] = actor
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ref)
            if todo:
                running[actor.run.remote(fn_ref, *todo.pop())] = actor
            yield self._get(ref)

    def close(self) -> None:
        ray = require_ray()
        for a in self.actors:
            ray.kill(a)

    def _get(self, ref):
        ray = require_ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            raise unwrap(e) from None


@contextmanager
def model_pool(spec: ModelChoice, workers: int | None, *, gpus: float | None = None):
    """A ModelPool for this block: `workers` actors (default: one per GPU of the cluster, or
    one), each with `gpus` GPUs (default one when the cluster has GPUs)."""
    have = cluster_gpus()
    gpus = (1.0 if have else 0.0) if gpus is None else gpus
    pool = ModelPool(spec, workers or max(1, int(have // max(gpus, 1))), gpus=gpus)
    try:
        yield pool
    finally:
        pool.close()


def map_shards(
    fn: Callable, shards: Iterable, *, backend=None, pool: ModelPool | None = None
) -> Iterator[tuple[int, object]]:
    """(index, fn(backend, shard)) for every shard: in order here on `backend`, or on the
    pool's actors as they finish. The caller writes each result as it comes back."""
    shards = list(shards)
    if pool is not None:
        yield from pool.map(fn, shards)
        return
    for i, shard in enumerate(shards):
        yield i, fn(backend, shard)


class _Slots:
    """A Ray actor holding a semaphore: one concurrency limit for many processes."""

    def __init__(self, n: int):
        import asyncio

        self.sem = asyncio.Semaphore(n)

    async def acquire(self) -> None:
        await self.sem.acquire()

    async def release(self) -> None:
        self.sem.release()


class SharedLimit:
    """`async with limit:` holds one of `n` slots shared by every task that holds this object
    (the judge's requests in flight across a sweep's tasks)."""

    def __init__(self, n: int):
        ray = require_ray()
        self.actor = ray.remote(_Slots).options(num_cpus=0, max_concurrency=10_000).remote(n)

    async def __aenter__(self):
        await self.actor.acquire.remote()

    async def __aexit__(self, *exc):
        self.actor.release.remote()
