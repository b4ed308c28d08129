"""trace-diff between a tiny Llama and a copy with one perturbed block: the difference appears
at the rows after that block and nowhere before it."""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import pertoken.trace
from pertoken import cli
from pertoken.backends import load_backend
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.pipeline.trace.diff import trace_diff
from pertoken.vectors import PersonaVector

CHATS = [
    [{"role": "user", "content": "What should I do about money?"},
     {"role": "assistant", "content": "I think you should decide for yourself."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>hmm</think>The quick brown fox."}],
    [{"role": "user", "content": "Please explain how plants grow."}],
]  # fmt: skip
ROWS = [1, 2, 3, 4]
PERTURBED_BLOCK = 2  # its output is row 3


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("diff")
    tuned = tmp / "tuned"
    shutil.copytree(llama_dir, tuned)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).float()
    with torch.no_grad():
        model.model.layers[PERTURBED_BLOCK].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(tuned)
    chats = tmp / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"messages": m, "id": i}) + "\n" for i, m in enumerate(CHATS))
    )
    vec = PersonaVector(np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32))
    out = {}
    for name, folder in (("base", llama_dir), ("tuned", tuned)):
        b = load_backend(str(folder), "torch", dtype="float32", device="cpu")
        trace_dataset(
            b,
            input=chats,
            vectors={"pat": vec},
            rows=ROWS,
            out_dir=tmp / name,
            tracing=Tracing(page=False, progress=False),
        )
        out[name] = tmp / name
    out["chats"], out["vec"], out["tmp"] = chats, vec, tmp
    return out


def test_the_difference_is_where_the_perturbation_is(stores, tmp_path):
    res = CliRunner().invoke(
        cli.main, ["trace-diff", str(stores["base"]), str(stores["tuned"]), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    diff, items = pertoken.trace.load(tmp_path)
    base, _ = pertoken.trace.load(stores["base"])
    tuned, _ = pertoken.trace.load(stores["tuned"])
    assert diff["token_id"].equals(base["token_id"]) and diff["segment"].equals(base["segment"])
    for r in ROWS:
        want = tuned[f"proj.pat.L{r}"] - base[f"proj.pat.L{r}"]
        np.testing.assert_allclose(diff[f"proj.pat.L{r}"], want, atol=1e-6)
    for r in (1, 2):  # before the perturbed block: nothing moved
        assert np.abs(diff[f"proj.pat.L{r}"]).max() < 1e-5
        assert np.abs(diff[f"norm.L{r}"]).max() < 1e-5
    for r in (3, 4):  # its output and after: the tokens moved
        assert np.median(np.abs(diff[f"proj.pat.L{r}"])) > 1e-2
    assert np.median(np.abs(diff["norm.L3"])) > 1e-2  # (row 4 is normed: its |h| barely moves)
    assert np.abs(items["mean.pat.L3.answer"]).min() > 0 and items["id"].tolist() == [0, 1, 2]
    assert np.all(np.abs(items[["mean.pat.L1.prompt", "prompt_last.pat.L2"]]) < 1e-5)
    moved = (tmp_path / "moved.csv").read_text().splitlines()
    assert moved[0].startswith("item,n_tokens,mean.pat.L1") and len(moved) == 4
    assert "moved most (pat, layer 3, mean B - A): item" in res.output
    assert re.search(r"top spans \(pat, layer [34]\)", res.output)  # where it moved
    assert (tmp_path / "stats" / "spans.csv").is_file() and (tmp_path / "trace.html").is_file()


def test_stores_of_other_transcripts_are_refused(stores, llama_dir, tmp_path):
    b = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    other = tmp_path / "other.jsonl"
    changed = [[*CHATS[0][:1], {"role": "assistant", "content": "No."}], *CHATS[1:]]
    other.write_text("".join(json.dumps({"messages": m}) + "\n" for m in changed))
    kw = dict(vectors={"pat": stores["vec"]}, tracing=Tracing(page=False, progress=False))
    trace_dataset(b, input=other, rows=ROWS, out_dir=tmp_path / "other", **kw)
    with pytest.raises(PertokenError, match=r"hold different tokens \(item 0\)"):
        trace_diff(stores["base"], tmp_path / "other", out_dir=tmp_path / "d1")
    assert not [p for p in (tmp_path / "d1").rglob("*") if p.name.endswith(".tmp")]
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS[:2]))
    trace_dataset(b, input=fewer, rows=ROWS, out_dir=tmp_path / "fewer", **kw)
    with pytest.raises(PertokenError, match="hold different items"):
        trace_diff(stores["base"], tmp_path / "fewer", out_dir=tmp_path / "d2")
    trace_dataset(b, input=stores["chats"], rows=[1, 2], out_dir=tmp_path / "rows", **kw)
    with pytest.raises(PertokenError, match="different rows"):
        trace_diff(stores["base"], tmp_path / "rows", out_dir=tmp_path / "d3")


def test_an_output_inside_an_input_store_is_refused(stores):
    before = {p: p.read_bytes() for p in stores["base"].iterdir() if p.is_file()}
    for out in (stores["base"], stores["tuned"], stores["base"] / "sub"):
        res = CliRunner().invoke(
            cli.main, ["trace-diff", str(stores["base"]), str(stores["tuned"]), "--out", str(out)]
        )
        assert res.exit_code != 0 and "choose an --out outside both stores" in res.output
        assert "Traceback" not in res.output
    assert {p: p.read_bytes() for p in stores["base"].iterdir() if p.is_file()} == before
    assert not (stores["base"] / "sub").exists()


def test_stores_traced_with_other_vector_files_are_refused(stores, llama_dir, tmp_path):
    b = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    other = PersonaVector(stores["vec"].data * 2)
    trace_dataset(
        b,
        input=stores["chats"],
        vectors={"pat": other},
        rows=ROWS,
        out_dir=tmp_path / "other",
        tracing=Tracing(page=False, progress=False),
    )
    with pytest.raises(PertokenError, match="traced vector 'pat' from different files"):
        trace_diff(stores["base"], tmp_path / "other", out_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_the_report_ranks_by_the_layer_that_moved(stores, tmp_path):
    res = CliRunner().invoke(
        cli.main, ["trace-diff", str(stores["base"]), str(stores["tuned"]), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("moved most")]
    assert re.match(r"moved most \(pat, layer [34], mean B - A\): item", lines[0])
    assert "moved most (pat, layer 1): nothing moved" in lines
    assert "moved most (pat, layer 2): nothing moved" in lines
    assert "+0.000" not in res.output and re.search(r"top spans \(pat, layer [34]\)", res.output)


def test_a_store_against_itself_moved_nowhere(stores, tmp_path):
    res = CliRunner().invoke(
        cli.main, ["trace-diff", str(stores["base"]), str(stores["base"]), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert "nothing moved: A and B agree at every vector and layer traced" in res.output
    assert all(x.endswith("nothing moved") for x in res.output.splitlines() if "moved most" in x)
