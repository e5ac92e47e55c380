"""mqt_jax/evaluation/benchmarks/vqav2.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import vqav2 as this
from mqt_jax.evaluation.benchmarks.base import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"),  # number words
    ("the dog", "dog"),  # articles
    ("a cat and an owl", "cat and owl"),
    ("Yes.", "yes"),  # a period not in a number
    ("3.5", "3.5"),  # ... kept in one
    ("1,000", "1000"),  # digit-separating comma
    ("dont", "don't"),  # contractions restored
    ("red-white", "red white"),  # punctuation without spaces becomes a space
    ("red - white", "red white"),  # ... next to a space it is dropped
    ("Whats up?", "what's up"),
    ("man's hat", "man 's hat"),
    ("  New\nYork ", "new york"),
])
def test_vqa_normalize(raw, want):
    assert this.vqa_normalize(raw) == want


@pytest.mark.parametrize("matches,want", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # left out: 0 matches; kept in: 1 of 3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9
    (4, 1.0),  # any 9 still hold 3 matches
    (10, 1.0),
])
def test_vqa_score_averages_the_ten_leave_one_out_subsets(matches, want):
    humans = ["two"] * matches + ["three"] * (10 - matches)
    assert this.vqa_score("2", humans) == pytest.approx(want)


def test_vqav2_scores_and_writes_the_upload_format(tmp_path):
    refs = tmp_path / "annotations.json"
    refs.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8}]}))
    questions = qs(1, 2)
    bench = bm.get("vqav2")
    loaded = bench.references(refs, questions)
    result = bench.score({"1": "Yes", "2": "two"}, questions, loaded)
    assert result["score"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    upload = json.loads(bench.submission({"1": "Yes", "2": "two"}, questions, loaded, 4)["answers_upload.json"])
    assert upload == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}]
