"""mqt_jax/evaluation/benchmarks/shapes.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks.base import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


def test_shapes_exact_match_per_category_and_majority_baseline(tmp_path):
    answers = [("a", "yes", "coarse", "has"), ("b", "yes", "coarse", "has"), ("c", "no", "coarse", "has"),
               ("d", "red", "fine", "colour"), ("e", "blue", "fine", "colour"),
               ("f", "Red", "fine", "colour"), ("g", "0", "fine", "count")]
    refs = tmp_path / "answers.jsonl"
    refs.write_text("".join(json.dumps({"question_id": q, "answer": a, "category": c, "type": t}) + "\n"
                            for q, a, c, t in answers))
    questions = qs(*"abcdefg")
    bench = bm.get("shapes")
    loaded = bench.references(refs, questions)
    predictions = {"a": "Yes.", "b": "no", "c": "no", "d": "red", "e": "red", "f": "red", "g": "1"}
    se = lambda right, n: 100 * ((right / n) * (1 - right / n) / n) ** 0.5  # noqa: E731
    assert bench.score(predictions, questions, loaded) == {
        "score": pytest.approx(100 * 4 / 7), "coarse": pytest.approx(100 * 2 / 3), "fine": 50.0,
        "stderr": {"score": pytest.approx(se(4, 7)), "coarse": pytest.approx(se(2, 3)),
                   "fine": pytest.approx(se(2, 4))},
        "by_type": {"has": pytest.approx(100 * 2 / 3), "colour": pytest.approx(100 * 2 / 3), "count": 0.0},
        "by_type_stderr": {"has": pytest.approx(se(2, 3)), "colour": pytest.approx(se(2, 3)), "count": 0.0}}
    # per type: has -> "yes" (2 of 3), colour -> "red" (2 of 3, "Red" normalised), count -> "0"
    baseline = bench.majority_baseline(questions, loaded)
    assert {k: baseline[k] for k in ("score", "coarse", "fine")} == {
        "score": pytest.approx(100 * 5 / 7), "coarse": pytest.approx(100 * 2 / 3), "fine": 75.0}
    assert baseline["by_type"] == {"has": pytest.approx(100 * 2 / 3), "colour": pytest.approx(100 * 2 / 3),
                                   "count": 100.0}
