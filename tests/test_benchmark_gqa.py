"""mqt_jax/evaluation/benchmarks/gqa.py: its official scoring on hand-computed cases, and its file
formats."""

import json

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks.base import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


def test_gqa_exact_match_and_prediction_file(tmp_path):
    refs = tmp_path / "testdev_balanced_questions.json"
    refs.write_text(json.dumps({"201": {"question": "q", "answer": "left"},
                                "202": {"question": "q", "answer": "no"}}))
    bench = bm.get("gqa")
    loaded = bench.references(refs, qs(201, 202))
    assert bench.score({"201": "Left.", "202": "yes"}, qs(201, 202), loaded)["score"] == 50.0
    rows = json.loads(bench.submission({"201": "Left.", "202": "yes"}, qs(201, 202), loaded, 1)
                      ["testdev_balanced_predictions.json"])
    assert rows == [{"questionId": "201", "prediction": "left"}, {"questionId": "202", "prediction": "yes"}]
