"""Commands of the method's third use: finetune, screen, shift."""

from __future__ import annotations

import click

from pertoken.commands import options
from pertoken.commands.options import (
    backend_option,
    cache_option,
    gather,
    judge_options,
    model_options,
)
from pertoken.pipeline.options import Generation, JudgeSettings, ModelChoice


@click.command()
@click.option("--model", "-m", required=True, help="Hugging Face hub id or local folder.")
@backend_option()
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (auto).")
@click.option("--device", default=None, help="torch: cuda, cpu or mps; mlx: gpu or cpu.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Chat JSONL.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Model folder.")
@click.option("--method", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank.")
@click.option("--alpha", default=None, type=float, help="LoRA alpha (default 2 x rank).")
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--lr", default=None, type=float, help="Learning rate (1e-4 LoRA, 1e-5 full).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Chats per step.")
@click.option("--max-length", default=1024, show_default=True, type=int, help="Tokens per chat.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--steer",
    "steers",
    multiple=True,
    help="Preventative steering during training, V.pt:LAYER:COEF (never saved in the model).",
)
@click.option(
    "--ablate", "ablates", multiple=True, help="Project V.pt's row out during training (CAFT)."
)
def finetune(model, backend, dtype, device, data, out, steers, ablates, **settings):
    """Finetune on chat JSONL (loss on assistant turns) into a folder --model can load.

    Ctrl-C saves a checkpoint; the same command again resumes."""
    from pertoken.pipeline.finetune.train import FinetuneOptions
    from pertoken.pipeline.finetune.train import finetune as run_finetune

    opts = FinetuneOptions(model=model, data=data, out=out, backend=backend, dtype=dtype,
                           device=device, steer=list(steers), ablate=list(ablates),
                           **settings)  # fmt: skip
    res = run_finetune(opts)
    r = res.record
    if res.done_before:
        click.echo(f"{out} already holds this finetune ({r['steps']} steps): nothing to do")
    elif res.resumed_at:
        click.echo(f"resumed at step {res.resumed_at} of {r['steps']}")
    loss = r["loss"]
    click.echo(
        f"{r['method']} on {r['examples']} chats ({r['skipped']} without an assistant token "
        f"within --max-length): loss {loss[0]:.4f} -> {loss[-1]:.4f} over {r['steps']} steps, "
        f"{r['tokens_per_second']:.0f} tokens/s"
    )
    click.echo(f"{out}: model (config, safetensors, tokenizer), finetune.json, loss.png")


@click.command()
@model_options()
@options.vectors_option()
@click.option("--layer", required=True, type=int, help="Row to project at.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Chat JSONL.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Scores CSV.")
@click.option("--n", default=1, show_default=True, type=int, help="Model answers per prompt.")
@click.option("--temperature", default=None, type=float, help="Default 0 for n=1, else 1.")
@click.option("--max-new-tokens", default=200, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--label", default=None, help="A 0/1 key of the JSONL lines: report the AUROC.")
@options.ray_options
@gather(choice=ModelChoice)
def screen(choice, vectors, layer, data, out, n, temperature, max_new_tokens, seed, batch_size,
           label, ray_address, workers):  # fmt: skip
    """Projection difference per sample: the data's answers against the model's own.

    A high proj_diff flags data that pushes the model along the vector; a screen, not a
    verdict."""
    from pertoken.commands.steering import _named_vectors
    from pertoken.pipeline.finetune.screen import (
        check_generation,
        screen_dataset,
        screen_directions,
    )
    from pertoken.vectors import load_vector

    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    generation = Generation(n, max_new_tokens, temperature, seed=seed, batch_size=batch_size)
    check_generation(generation)
    with options.model_or_pool(choice, ray_address, workers) as (bk, pool):
        d = screen_directions(bk, loaded, layer)
        res = screen_dataset(bk, generation, data=data, directions=d, out=out, label=label,
                             pool=pool)  # fmt: skip
    for name, m in res.means.items():
        auroc = f", AUROC {res.auroc[name]:.3f} for {label}" if res.auroc else ""
        click.echo(
            f"{name} layer {layer}: mean proj_data {m['proj_data']:.4g}, proj_model "
            f"{m['proj_model']:.4g}, proj_diff {m['proj_diff']:.4g}{auroc}"
        )
    stem = res.out_path.with_suffix("")
    click.echo(f"{res.out_path}: {res.rows} samples; {stem}.json, {stem}.png ({res.seconds:.1f}s)")


@click.command()
@click.pass_context
@click.option("--base", required=True, help="The model before finetuning.")
@click.option("--finetuned", required=True, multiple=True, help="A finetuned model (repeatable).")
@backend_option()
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (auto).")
@click.option("--device", default=None, help="torch: cuda, cpu or mps; mlx: gpu or cpu.")
@options.trait_option
@click.option("--vector", "-v", "vector_path", required=True, type=click.Path(dir_okay=False))
@click.option("--layers", required=True, help="Rows to measure at, e.g. 12,16.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder.")
@judge_options
@cache_option
@click.option("--n-per-question", default=4, show_default=True, help="Judged answers each.")
@click.option("--max-new-tokens", default=200, show_default=True)
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@click.option("--seed", default=0, show_default=True)
@gather(judging=JudgeSettings, generation=Generation)
def shift(ctx, base, finetuned, backend, dtype, device, trait, vector_path, layers, out,
          judging, generation):  # fmt: skip
    """Shift of each finetuned model along a persona vector; with --judge MODEL (or --base-url)
    also each model's judged trait score and the correlation between the two across models."""
    from pertoken.pipeline.finetune.shift import format_shift, shift_models
    from pertoken.pipeline.judge.judges import make_judge
    from pertoken.rows import parse_layers
    from pertoken.traits import load_trait
    from pertoken.vectors import load_vector

    kit = load_trait(trait)
    judge = None
    given = [ctx.get_parameter_source(p) for p in ("judge_model", "base_url")]
    if any(g is not click.core.ParameterSource.DEFAULT for g in given):
        judge = make_judge(kit, judging, model=ModelChoice("", backend))
        judge.check(reach=False)
    rows = parse_layers(layers)
    models = [ModelChoice(m, backend, dtype, device) for m in (base, *finetuned)]
    res = shift_models(models, load_vector(vector_path), rows, kit, out, generation, judge)
    click.echo(format_shift(res, rows, kit.name))
    files = "shift.csv" + (", scores.csv, answers.csv, shift.json, shift.png" if judge else "")
    click.echo(f"{out}: {files} ({res.seconds:.1f}s)")


COMMANDS = [finetune, screen, shift]
