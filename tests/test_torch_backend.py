"""What only the torch backend does; the Backend protocol itself is test_backend_contract.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pertoken.backends import load_backend
from pertoken.backends.torch.hooks import TapState, residual_taps
from pertoken.errors import PertokenError
from tests.reference import ANSWERS, chat_prompts, hf_hidden


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend(str(model_dir), "torch", dtype="float32", device="cpu")


prompts = chat_prompts


def test_last_row_has_final_norm(backend):
    # HF's last hidden state is norm(last block output): its RMS is set by the norm weight,
    # unlike the raw residual, so a row-4 capture taken before the norm would not match.
    p = prompts(backend)[0]
    ids = backend.encode(p + ANSWERS[0])
    hs = hf_hidden(backend.model, ids)
    got = backend.summaries([p], [ANSWERS[0]]).prompt_avg[0]
    P = len(backend.encode(p))
    np.testing.assert_allclose(got[4], hs[4, :P].mean(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(hs[3], hs[4], atol=1e-2)


def test_generation_stops_at_end_of_turn(backend):
    eot = int(backend.stop_ids[-1])
    word = backend.encode(" the")[0]

    def eot_first(_module, _args, logits):  # [B, t, vocab]: the stop token, then `word`
        forced = torch.full_like(logits, -1e4)
        forced[..., eot] = 0.0
        forced[..., word] = -1.0
        return forced

    handle = backend.model.lm_head.register_forward_hook(eot_first)
    try:
        out = backend.generate(prompts(backend)[:2], max_new_tokens=8, temperature=0)
        traced = backend.trace(prompts(backend)[0], rows=[1], max_new_tokens=8)
    finally:
        handle.remove()
    # the stop token cannot be the first answer token, and ends the answer after it
    assert out == [backend.decode([word])] * 2 and out[0]
    assert traced.token_ids == [word] and traced.hidden.shape == (1, 1, 64)
    assert len(backend.generate(prompts(backend)[:1], max_new_tokens=8, temperature=0)[0]) > 0


def _rows_with(backend, ids, steer_by_row, mask=None):
    """All rows [n_layers+1, T, hidden] of one sequence with raw steering through the taps."""
    got = {}
    state = TapState(
        steer={k: torch.tensor(v) for k, v in steer_by_row.items()},
        steer_mask=mask,
        rows=frozenset(range(backend.n_layers + 1)),
        on_row=lambda r, h: got.__setitem__(r, h[0].clone()),
    )
    with torch.no_grad(), residual_taps(backend.model, state):
        backend.model(input_ids=torch.tensor([ids]))
    return torch.stack([got[r] for r in range(backend.n_layers + 1)]).numpy()


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_position_mask_steers_only_its_tokens(backend, positions):
    from pertoken.backends.base import steer_mask
    from pertoken.backends.plan import left_pad
    from pertoken.backends.torch.batch import steer_tensor

    ids = backend.encode(prompts(backend)[0] + ANSWERS[0])
    P = len(backend.encode(prompts(backend)[0]))
    batch = left_pad([ids], backend.pad_id, prompt_lens=[P])
    mask = steer_tensor(batch, positions, "cpu")
    np.testing.assert_array_equal(mask[0].numpy(), steer_mask(P, len(ids), positions))
    vec = np.ones(64, np.float32)
    base = _rows_with(backend, ids, {})
    steered = _rows_with(backend, ids, {1: vec}, mask)
    diff = np.abs(steered[1] - base[1]).max(-1)  # [T]
    expect = steer_mask(P, len(ids), positions)
    assert (diff[expect] > 0.99).all() and (diff[~expect] < 1e-6).all()
    if positions == "response":
        assert expect[P - 1] and not expect[P - 2]


def test_registry_errors(monkeypatch):
    import importlib.util

    from pertoken.backends import resolve

    with pytest.raises(PertokenError, match="unknown backend"):
        resolve("jax")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "mlx" else real(n))
    with pytest.raises(PertokenError, match=r"pertoken\[mlx\]"):
        resolve("mlx")
    assert resolve("auto") == "torch"


def test_import_and_help_stay_light():
    code = (
        "import sys, pertoken, pertoken.cli;"
        "from click.testing import CliRunner;"
        "r = CliRunner().invoke(pertoken.cli.main, ['--help']);"
        "assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('numpy', 'torch', 'mlx', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy;"
        "import pertoken.backends;"
        "heavy = [m for m in ('torch', 'mlx', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy;"
        "print(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for group in ("generate", "judge", "extract", "run", "steer", "monitor", "decompose"):
        assert group in out.stdout
