"""mqt_jax/evaluation/benchmarks/mmbench.py: its official scoring on hand-computed cases, and its file
formats."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import base
from mqt_jax.evaluation.benchmarks import mmbench as this


def mmbench_tsv(path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
            ["10", "Colour?", "nan", "red", "green", "blue", "nan", "A", "colour", image],
            ["11", "Shape?", "A hint", "circle", "square", "nan", "nan", "B", "shape", image]]
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def test_mmbench_rotates_options_and_scores_circularly(tmp_path):
    mmbench_tsv(tmp_path / "mmbench_dev.tsv")
    bench = bm.get("mmbench")
    questions = bench.questions(tmp_path / "mmbench_dev.tsv")
    assert [q.question_id for q in questions] == ["10_r0", "10_r1", "10_r2", "11_r0", "11_r1"]
    assert questions[1].text == "Colour?\nA. green\nB. blue\nC. red\n" + base.LETTER_ANSWER
    assert [q.meta["answer"] for q in questions] == ["A", "C", "B", "B", "A"]
    assert questions[3].text.startswith("A hint\nShape?\nA. circle")
    assert np.asarray(questions[0].image).shape == (8, 8, 3)
    refs = bench.references(None, questions)
    # question 10 right in every rotation; question 11 right in round 0 only
    predictions = {"10_r0": "A", "10_r1": "C", "10_r2": "B.", "11_r0": "B", "11_r1": "B"}
    result = bench.score(predictions, questions, refs)
    assert result["score"] == 50.0 and result["single_round"] == 100.0
    assert result["category/colour"] == 100.0 and result["category/shape"] == 0.0
    tsv = bench.submission(predictions, questions, refs, 1)["mmbench_predictions.tsv"].splitlines()
    assert tsv[2].split("\t")[0] == "1000010" and tsv[2].split("\t")[-2] == "C"


@pytest.mark.parametrize("text,want", [("B", "B"), ("B.", "B"), ("(C) blue", "C"),
                                       ("It is green", "B"), ("A or B", None), ("pink", None)])
def test_mmbench_letter_inference(text, want):
    assert this.mmbench_letter(text, ["red", "green", "blue"]) == want
