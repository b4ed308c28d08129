"""Count a server's model forward passes (`bench_serve.py --count`).

With this folder first on PYTHONPATH and COUNT_FORWARDS=OUT.json and COUNT_KIND=mlx|torch in
the environment, `sitecustomize.py` here patches the model classes of every Python process that
starts (a server and the processes it spawns, as `transformers serve` runs its model in one):
each forward of pertoken's MLX models, mlx-lm's, or a transformers causal LM adds one pass and
its rows (batch x positions) to OUT, rewritten whole after each forward, so a reader between
loads sees the work done so far. Two servers given the same requests can then be compared by
the work they did, whatever the machine: on a CPU a forward's time goes with its rows, on a GPU
with its passes (each reads all the weights). Only one process of a server may run forwards.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

MLX = [
    "pertoken.backends.mlx.models.llama",
    "pertoken.backends.mlx.models.gemma2",
    "mlx_lm.models.llama",
    "mlx_lm.models.gemma2",
    "mlx_lm.models.qwen2",
]
TORCH = [
    "transformers.models.llama.modeling_llama.LlamaForCausalLM",
    "transformers.models.gemma2.modeling_gemma2.Gemma2ForCausalLM",
    "transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM",
]


class Counter:
    def __init__(self, out: str):
        self.out, self.passes, self.rows = out, 0, 0

    def add(self, ids) -> None:
        if ids is not None and len(ids.shape) == 2:
            self.passes += 1
            self.rows += int(ids.shape[0]) * int(ids.shape[1])
            tmp = f"{self.out}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"passes": self.passes, "rows": self.rows}, f)
            os.replace(tmp, self.out)  # a reader never sees half a file


def _find(path: str):
    """The class at `path` (a module's `Model` for MLX), None where it is not installed."""
    module, name = path.rsplit(".", 1) if path.endswith("CausalLM") else (path, "Model")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # an older tree or another library version: not counted
        print(f"forward_counter: no {path} here", file=sys.stderr)
        return None


def count_mlx(counter: Counter) -> None:
    for name in MLX:
        if (cls := _find(name)) is None:
            continue
        call = cls.__call__

        def counted(self, inputs, *a, _call=call, **k):
            counter.add(inputs)
            return _call(self, inputs, *a, **k)

        cls.__call__ = counted


def count_torch(counter: Counter) -> None:
    for path in TORCH:
        if (cls := _find(path)) is None:
            continue
        forward = cls.forward

        def counted(self, *a, _forward=forward, **k):
            counter.add(k.get("input_ids", a[0] if a else None))
            return _forward(self, *a, **k)

        cls.forward = counted


def install() -> None:
    counter = Counter(os.environ["COUNT_FORWARDS"])
    (count_mlx if os.environ.get("COUNT_KIND") == "mlx" else count_torch)(counter)
