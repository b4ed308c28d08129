"""Commands of the method's third use: finetune, screen, shift."""

from __future__ import annotations

import click

from pertoken.commands.options import backend_option


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


COMMANDS = [finetune]
