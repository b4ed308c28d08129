"""A model split by a device_map (as `--device auto` splits one over several GPUs) against the
same model on one device.

This machine has one device type, so the split puts blocks 2 and 3 on accelerate's "disk": their
parameters live on the meta device and are loaded onto the CPU for each forward, through the same
accelerate hooks that move activations between GPUs. What this checks: the hooks' steering and
capture work through accelerate's wrappers, steering vectors go to the device a block runs on
(not to where its parameters sit: meta would fail), and logits, summaries, greedy tokens,
steered answers and traces equal the single-device model's. Moving tensors between two real
devices needs two GPUs (`test_two_gpus_equal_one`)."""

import numpy as np
import pytest
import torch

from pertoken.backends import Steer
from pertoken.backends.torch import TorchBackend
from pertoken.backends.torch.hooks import block_devices, execution_device
from pertoken.backends.torch.load import _placement, pick_device, pick_dtype
from pertoken.errors import PertokenWarning
from tests.reference import ANSWERS, chat_prompts

pytest.importorskip("accelerate", reason="sharding needs accelerate, a pertoken dependency")

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _split(model_dir, folder, device_map=SPLIT, device="cpu", **kw) -> TorchBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(folder)
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    return TorchBackend(lm.eval(), tok, model_id="split", dtype="float32", device=device, **kw)


@pytest.fixture(scope="module")
def pair(model_dir, tmp_path_factory):
    one = TorchBackend.load(str(model_dir), dtype="float32", device="cpu")
    return one, _split(model_dir, tmp_path_factory.mktemp("offload"))


def _steer(b, positions="response"):
    vec = np.random.default_rng(0).standard_normal(b.hidden_size).astype(np.float32)
    return Steer.single(3, vec, 4.0, positions=positions)  # block 2: an offloaded one


def test_vectors_go_where_blocks_run_not_where_parameters_sit(pair):
    _, split = pair
    layers = split.model.model.layers
    assert [next(layer.parameters()).device.type for layer in layers] == ["cpu"] * 2 + ["meta"] * 2
    assert block_devices(split.model) == [torch.device("cpu")] * 4
    state = split._tap_state(_steer(split))
    assert state.steer[3].device == torch.device("cpu")  # keyed by row


def test_logits_equal_one_device(pair):
    one, split = pair
    text = chat_prompts(one)[1] + ANSWERS[1]
    for steer, plen in ((None, None), (_steer(one, "all"), None), (_steer(one), 12)):
        want = one.logits(text, steer=steer, prompt_len=plen)
        got = split.logits(text, steer=steer, prompt_len=plen)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_summaries_equal_one_device(pair):
    one, split = pair
    ps = chat_prompts(one)
    for got, want in zip(split.summaries(ps, ANSWERS, batch_size=3), one.summaries(ps, ANSWERS)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_and_steered_answers_equal_one_device(pair, torch_one_thread):
    one, split = pair
    ps = chat_prompts(one)
    for steer in (None, _steer(one)):
        want = one.generate(ps, max_new_tokens=16, temperature=0, steer=steer, batch_size=3)
        assert split.generate(ps, max_new_tokens=16, temperature=0, steer=steer) == want


def test_trace_equals_one_device(pair, torch_one_thread):
    one, split = pair
    p = chat_prompts(one)[0]
    want = one.trace(p, max_new_tokens=12, rows=[1, 3, 4], steer=_steer(one))
    got = split.trace(p, max_new_tokens=12, rows=[1, 3, 4], steer=_steer(one))
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)


def test_compiled_step_on_a_split_model(pair, model_dir, tmp_path, torch_one_thread):
    one, _ = pair
    split = _split(model_dir, tmp_path, compile=True)
    ps = chat_prompts(one)
    steer = _steer(one)
    want = one.generate(ps, max_new_tokens=16, temperature=0, steer=steer, batch_size=3)
    assert split.generate(ps, max_new_tokens=16, temperature=0, steer=steer) == want


def test_device_auto_shards_over_several_gpus_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == pick_device(None) == "auto"
    assert pick_dtype(None, "auto") == "bfloat16"
    assert _placement("auto") == {"device_map": "auto"}
    assert _placement("cuda") == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"


def test_accelerate_execution_device_wins_over_parameters():
    from accelerate.hooks import AlignDevicesHook

    block = torch.nn.Linear(2, 2, device="meta")
    block._hf_hook = AlignDevicesHook(execution_device=1)  # as dispatch_model leaves it
    assert execution_device(block) == torch.device("cuda:1")
    assert execution_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_equal_one(llama_dir):
    one = TorchBackend.load(str(llama_dir), dtype="float32", device="cuda:0")
    n = one.n_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map |= {f"model.layers.{i}": int(i >= n // 2) for i in range(n)}
    split = _split(llama_dir, "unused", device_map=device_map, device="cuda:0")
    ps = chat_prompts(one)
    for steer in (None, _steer(one)):
        want = one.generate(ps, max_new_tokens=16, temperature=0, steer=steer)
        assert split.generate(ps, max_new_tokens=16, temperature=0, steer=steer) == want
    np.testing.assert_allclose(
        split.summaries(ps, ANSWERS).response_avg, one.summaries(ps, ANSWERS).response_avg, 1e-4
    )
    with pytest.warns(PertokenWarning, match="split across devices"):
        compiled = _split(llama_dir, "unused", device_map=device_map, device="cuda:0", compile=True)
    assert compiled.generate(ps, max_new_tokens=16, temperature=0) == one.generate(
        ps, max_new_tokens=16, temperature=0
    )


def test_device_auto_on_mlx_is_its_default():
    pytest.importorskip("mlx.core")
    from pertoken.backends.mlx.load import pick_device as mlx_device

    assert mlx_device("auto") == mlx_device(None) in ("gpu", "cpu")
