"""Reading generation CSVs made by other tools: pandas round trips, BOMs, bad bytes and rows."""

import csv

import pytest

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import parse_sample, parse_score, read_csv, read_table, sample_keys
from pertoken.pipeline.extract import pair_rows
from pertoken.pipeline.generate import generate_csv, is_complete, plan_rows
from pertoken.pipeline.options import Generation
from pertoken.pipeline.sweep.plot import summarize
from pertoken.traits import load_trait
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import write_kit

HEADER = ["question", "prompt", "answer", "question_id", "evil", "coherence", "sample"]


def write(path, rows, *, header=HEADER, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def extraction_rows(polarity, scores, sample=str):
    """One row per (trait, coherence) score pair: question 0, instruction 0, samples 0, 1, ..."""
    return [
        ["q", "p", f"answer {j}", f"evil_0_{polarity}_0", s, c, sample(j)]
        for j, (s, c) in enumerate(scores)
    ]


def test_sample_written_as_float_is_read_as_int(tmp_path):
    # pandas writes an int column holding a gap as floats: 0.0, 1.0, ...
    pos = write(tmp_path / "pos.csv", extraction_rows("pos", [(90, 90)] * 2, lambda j: f"{j}.0"))
    neg = write(tmp_path / "neg.csv", extraction_rows("neg", [(0, 90)] * 2, lambda j: f"{j}.0"))
    _, rows = read_csv(pos)
    assert [r["sample"] for r in rows] == ["0", "1"]
    assert sample_keys(rows) == [("evil_0_pos_0", 0), ("evil_0_pos_0", 1)]
    pairs = pair_rows(pos, neg, trait="evil")
    assert pairs.total == 2 and [r["answer"] for r in pairs.pos] == ["answer 0", "answer 1"]
    assert parse_sample(" 3.0 ") == 3 and parse_sample("") is None
    for bad in ("1.5", "-1", "inf", "x"):
        with pytest.raises(ValueError):
            parse_sample(bad)


def test_a_pandas_round_trip_does_not_regenerate(tmp_path):
    pd = pytest.importorskip("pandas")
    kit = load_trait(write_kit(tmp_path, "evil"))
    fake, out = RecordingBackend(), tmp_path / "pos.csv"
    generate_csv(fake, kit, out, Generation(samples=2), progress=False)
    df = pd.read_csv(out, keep_default_na=False)
    df["sample"] = df["sample"].astype(float)
    df.to_csv(out, index=False)
    assert "0.0" in out.read_text()
    specs = plan_rows(kit, polarity="pos", n_per_question=2)
    assert is_complete(out, specs)
    res = generate_csv(fake, kit, out, Generation(samples=2), progress=False)
    assert res.generated == 0


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "pos.csv", extraction_rows("pos", [(90, 90)] * 3))
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"answer 1", b"answer \xff1")  # line 3: the second row
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(PertokenError, match=r"pos\.csv line 3 is not UTF-8 text .*0xff"):
        read_csv(path)


def test_ragged_row_names_the_file_and_line(tmp_path):
    rows = extraction_rows("pos", [(90, 90)] * 3)
    rows[0][2] = "two\nlines"  # one record over lines 2-3, so the third record starts at line 5
    rows[2].append("stray")
    path = write(tmp_path / "pos.csv", rows)
    with pytest.raises(PertokenError, match=r"pos\.csv line 5 has 8 cells but the header has 7"):
        read_csv(path)
    rows[2] = rows[2][:5]
    write(path, rows)
    with pytest.raises(PertokenError, match=r"line 5 has 5 cells"):
        read_table(path)
    (tmp_path / "s.csv").write_text("question,prompt,answer,question_id,sample\nq,p,a,i,1.5\n")
    with pytest.raises(PertokenError, match=r"s\.csv line 2: sample '1\.5' is not a whole"):
        read_csv(tmp_path / "s.csv")


def test_utf8_bom_is_read(tmp_path):
    path = write(tmp_path / "pos.csv", extraction_rows("pos", [(90, 90)]), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbfquestion")
    header, rows = read_csv(path)
    assert header == HEADER and rows[0]["question"] == "q"


def test_blank_lines_hold_no_rows(tmp_path):
    path = write(tmp_path / "pos.csv", extraction_rows("pos", [(90, 90)] * 2))
    path.write_text(path.read_text().replace("\r\n", "\r\n\r\n"))
    assert len(read_csv(path)[1]) == 2


def test_inf_and_nan_scores_are_missing(tmp_path):
    assert [parse_score(x) for x in ("inf", "-inf", "nan", "NaN", "", None, "7.5")] == [
        None,
        None,
        None,
        None,
        None,
        None,
        7.5,
    ]
    pos_scores = [(90, 90), ("inf", 90), (90, "inf"), (90, 90), ("nan", 90)]
    neg_scores = [(0, 90), (0, 90), (0, 90), ("-inf", 90), (0, 90)]
    pos = write(tmp_path / "pos.csv", extraction_rows("pos", pos_scores))
    neg = write(tmp_path / "neg.csv", extraction_rows("neg", neg_scores))
    pairs = pair_rows(pos, neg, trait="evil")
    assert pairs.total == 5 and [r["answer"] for r in pairs.pos] == ["answer 0"]
    rows = [{"layer": "1", "coef": "1", "evil": s, "coherence": "inf"} for s in ("inf", "40")]
    (s,) = summarize(rows, "evil")
    assert (s.trait, s.coherence, s.missing) == (40.0, None, 1)
