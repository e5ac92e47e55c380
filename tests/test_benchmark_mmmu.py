"""mqt_jax/evaluation/benchmarks/mmmu.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import mmmu as this


@pytest.mark.parametrize("response,want", [
    ("(B)", "B"),
    ("The answer is (C) because", "C"),
    ("A", "A"),
    ("I would say D is right", "D"),
    ("The correct one is clearly the small red square here", "B"),  # by option text
    ("Both (A) and then (C)", "C"),  # several: the last mentioned
])
def test_mmmu_multiple_choice_parsing(response, want):
    assert this.mmmu_choice(response, ["blue circle", "small red square", "green", "tree"], "q1") == want


def test_mmmu_unparseable_answer_is_a_seeded_random_choice():
    picks = {this.mmmu_choice("no idea", ["x", "y", "z", "w"], "question 9") for _ in range(5)}
    assert len(picks) == 1 and picks <= set("ABCD")


def test_mmmu_scores_choice_and_open_questions(tmp_path):
    questions_file = tmp_path / "mmmu.jsonl"
    questions_file.write_text(
        json.dumps({"question_id": "m1", "image": "a.png", "question": "Which?",
                    "options": "['cat', 'dog']", "question_type": "multiple-choice"}) + "\n"
        + json.dumps({"question_id": "m2", "image": "b.png", "question": "How many?",
                      "question_type": "open"}) + "\n")
    refs = tmp_path / "answers.jsonl"
    refs.write_text(json.dumps({"question_id": "m1", "answer": "B"}) + "\n"
                    + json.dumps({"question_id": "m2", "answer": "12"}) + "\n")
    bench = bm.get("mmmu")
    questions = bench.questions(questions_file)
    assert "A. cat\nB. dog" in questions[0].text
    loaded = bench.references(refs, questions)
    assert bench.score({"m1": "(B)", "m2": "12."}, questions, loaded)["score"] == 100.0
    assert bench.score({"m1": "A", "m2": "13"}, questions, loaded)["score"] == 0.0
    assert json.loads(bench.submission({"m1": "(B)", "m2": "12."}, questions, loaded, 1)
                      ["mmmu_predictions.json"]) == {"m1": "B", "m2": "12"}
