"""mqt_jax/evaluation/benchmarks/llava_bench.py: its official scoring on hand-computed cases, and its file
formats."""

import json

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import base
from mqt_jax.evaluation.benchmarks.base import Question


def test_judged_benchmarks_write_upstream_formats_and_no_score():
    questions = [Question("v1_0", "What is it?", "v1_0.png")]
    assert bm.get("mmvet").references(None, questions) == {}  # nothing to read
    assert bm.get("mmvet").score({"v1_0": "a cat"}, questions, {}) == {}
    assert json.loads(bm.get("mmvet").submission({"v1_0": "a cat"}, questions, {}, 4)
                      ["mmvet_results.json"]) == {"v1_0": "a cat"}
    row = json.loads(base.llava_answers({"v1_0": "a cat"}, questions, 4))
    assert row["question_id"] == "v1_0" and row["text"] == "a cat" and row["prompt"] == "What is it?"
    assert row["metadata"] == {"m": 4}
