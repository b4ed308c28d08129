"""Click options shared by the commands, with their choices taken from the pipeline's constants."""

from __future__ import annotations

import contextlib
import functools

import click

from pertoken.errors import PertokenError
from pertoken.names import BACKENDS, METHODS, POSITIONS, SAMPLERS
from pertoken.pipeline.judge.rubrics import DEFAULT_JUDGE
from pertoken.pipeline.options import FLAT_NAMES, JudgeSettings, ModelChoice, from_flat

BATCH_HELP = (
    "Answers decoding at once (default: what free memory holds on CUDA and Metal, else 16)."
)


def backend_option(help: str = "auto = mlx on Apple Silicon when installed."):
    return click.option(
        "--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help=help
    )


def model_options(default_model: str | None = None):
    """--model, --backend, --dtype, --device, shared by every command that loads a model."""

    def wrap(f):
        @click.option(
            "--model",
            "-m",
            default=default_model,
            required=default_model is None,
            help="Hugging Face hub id, local folder, or a GGUF file (or a folder holding one).",
        )
        @backend_option()
        @click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            expose_value=False,
            callback=_set_threads,
            help="torch's CPU threads (default: all cores). When several runs share a "
            "machine, give each a share (e.g. 1-2): oversubscribed threads stall.",
        )
        @click.option("--dtype", default=None, help="float32, bfloat16 or float16 (auto).")
        @click.option(
            "--device",
            default=None,
            help="torch: auto (sharded over several GPUs), cuda, cpu or mps; mlx: gpu or cpu.",
        )
        @functools.wraps(f)
        def inner(*args, **kwargs):
            return f(*args, **kwargs)

        return inner

    return wrap


def _set_threads(ctx, param, threads: int | None) -> None:
    if threads is None:
        return
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later
    import torch

    torch.set_num_threads(threads)


def load_model(choice: ModelChoice):
    """The chosen model, loaded (one place a command loads a model, for tests to replace)."""
    return choice.load()


def gather(**objects):
    """Hand the command ready option objects: each `name=Kind` (ModelChoice, Generation,
    JudgeSettings, Extraction) takes the command's flat options of that kind
    (`--n-per-question`, `--judge-model`, ...) and gives one frozen Kind as `name`."""

    def wrap(f):
        @functools.wraps(f)
        def inner(*args, **kwargs):
            for name, kind in objects.items():
                kwargs[name] = _build(kind, kwargs)
            return f(*args, **kwargs)

        return inner

    return wrap


def _build(kind, kwargs: dict):
    """One option object from the flat options it takes out of `kwargs`."""
    flat = {k: kwargs.pop(k) for k in FLAT_NAMES[kind] if k in kwargs}
    if kind is ModelChoice and "compile_" in kwargs:
        flat["compile"] = kwargs.pop("compile_")
    if kind is JudgeSettings and flat.get("coherence_prompt"):
        from pertoken.pipeline.judge.rubrics import read_rubric

        flat["coherence_prompt"] = read_rubric(flat["coherence_prompt"])
    return from_flat(kind, flat)


def vectors_option(
    required: bool = True, help: str = "NAME=FILE.pt (repeatable; NAME defaults to the file name)."
):
    """`--vector NAME=FILE.pt`, repeatable, into the `vectors` argument."""
    return click.option("--vector", "vectors", multiple=True, required=required, help=help)


def ray_options(f):
    """--ray and --workers: a stage's work spread over Ray actors, each loading the model."""
    f = click.option(
        "--workers", type=click.IntRange(min=1), default=None,
        help="With --ray: model actors (default one per GPU of the cluster, else one).",
    )(f)  # fmt: skip
    return click.option(
        "--ray", "ray_address", default=None, metavar="local|auto|ADDRESS",
        help="Spread the work over Ray actors: local starts Ray here, auto joins RAY_ADDRESS.",
    )(f)  # fmt: skip


@contextlib.contextmanager
def model_or_pool(choice: ModelChoice, ray_address, workers):
    """(backend, None) loaded here, or with --ray (ModelInfo, pool) of actors holding it."""
    if ray_address is None:
        if workers is not None:
            raise PertokenError("--workers needs --ray: give --ray local, auto or ADDRESS")
        yield load_model(choice), None
        return
    from pertoken.pipeline.distributed import model_pool, ray_runtime

    with ray_runtime(ray_address), model_pool(choice, workers) as pool:
        yield pool.info(), pool


def compile_option(f):
    return click.option(
        "--compile",
        "compile_",
        is_flag=True,
        help="torch: decode through a static KV cache captured as a CUDA graph "
        "(warm-up once per batch shape, reported).",
    )(f)


def report_compile(backend) -> None:
    """One line on the compiled decode step's warm-up, when the backend has one."""
    compiled = getattr(backend, "compiled", None)
    if compiled is None:
        return
    if not compiled.graphs:
        return click.echo("compiled decode step: static KV cache, no CUDA graph on this device")
    click.echo(f"compiled decode step: warm-up {compiled.warmup_seconds:.1f}s "
               f"({compiled.captures} CUDA graph capture(s))")  # fmt: skip


def trait_option(f):
    return click.option(
        "--trait", "-t", required=True, help="Bundled kit name, kit JSON, or upstream file."
    )(f)


def judge_options(f):
    f = click.option(
        "--max-consecutive-failures",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Stop after this many judge timeouts or connection failures in a row.",
    )(f)
    f = click.option(
        "--coherence-prompt",
        type=click.Path(dir_okay=False),
        default=None,
        help="Coherence rubric file with {question} and {answer} (default: the kit's, or ours).",
    )(f)
    f = click.option("--concurrency", default=32, show_default=True, help="Requests in flight.")(f)
    f = click.option("--base-url", default=None, help="Any OpenAI-compatible server.")(f)
    return click.option(
        "--judge-model",
        "--judge",
        "judge_model",
        default=DEFAULT_JUDGE,
        show_default=True,
        help="Judge model, or local:MODEL to judge in-process with a pertoken backend.",
    )(f)


def cache_option(f):
    return click.option(
        "--cache", default=None, help="Score cache (default ~/.cache/pertoken/judge.sqlite)."
    )(f)


def positions_option(f):
    return click.option(
        "--positions",
        type=click.Choice(POSITIONS),
        default="response",
        show_default=True,
        help="Where to add the vectors: the answer's tokens (as upstream's steerer), every "
        "token, or the prompt only.",
    )(f)


def method_option(f):
    return click.option(
        "--method",
        type=click.Choice(METHODS),
        default="mean_diff",
        show_default=True,
        help="probe: also a logistic-regression vector, {trait}_response_avg_probe.pt.",
    )(f)


def sampler_option(f):
    return click.option(
        "--sampler",
        type=click.Choice(SAMPLERS),
        default="plain",
        show_default=True,
        help="plain: --temperature only; model: the checkpoint's generation_config (top_k, "
        "top_p, repetition penalty; its temperature unless --temperature), as transformers' "
        "generate.",
    )(f)


def generation_options(default_tokens: int, sampler: bool = False):
    """--system, --max-new-tokens, --seed, --temperature (greedy by default); with `sampler`,
    also --sampler, and the temperature left to it when not given."""

    def wrap(f):
        f = click.option("--system", default=None, help="System prompt.")(f)
        f = click.option(
            "--max-new-tokens",
            default=default_tokens,
            show_default=True,
            type=int,
            help="Most tokens per answer.",
        )(f)
        f = click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")(f)
        if sampler:
            f = sampler_option(f)
            help_ = "Default 0 (greedy); with --sampler model, the checkpoint's."
            return click.option("--temperature", default=None, type=float, help=help_)(f)
        return click.option(
            "--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."
        )(f)

    return wrap


def operator_options(f):
    """--ablate and --cap beside --steer (applied after the --steer terms, in that order)."""
    f = click.option(
        "--cap",
        "caps",
        multiple=True,
        help="Clamp the projection on a vector: V.pt:LAYER:LO:HI, either bound may be empty "
        "(v.pt:12::4.5 caps from above); bounds in the units the monitor prints (repeatable).",
    )(f)
    return click.option(
        "--ablate",
        "ablates",
        multiple=True,
        help="Project a vector out: V.pt:LAYER, or V.pt:LAYER:MEAN to set the projection to "
        "a stored mean (repeatable).",
    )(f)
