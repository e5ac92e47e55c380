"""mqt_jax/evaluation/benchmarks/scienceqa.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import base


@pytest.mark.parametrize("prediction,want", [
    ("B", "B"), ("B. a cat", "B"), ("The answer is C.", "C"), ("E", None), ("I think so", None),
    ("The answer is A. The answer is B.", None),  # two answers: none
])
def test_scienceqa_letter_parsing(prediction, want):
    assert base.letter_of(prediction, 4) == want


def test_scienceqa_reads_llava_conversations_and_problems(tmp_path):
    questions_file = tmp_path / "llava_test_CQM-A.json"
    prompt = "<image>\nContext: x\nWhich is a mammal?\nA. cat\nB. eel\nC. owl\n" + base.LETTER_ANSWER
    questions_file.write_text(json.dumps([
        {"id": "5", "image": "5/image.png", "conversations": [{"from": "human", "value": prompt}]},
        {"id": "6", "conversations": [{"from": "human", "value": "no image"}]},  # not in -IMG
        {"id": "7", "image": "7/image.png", "conversations": [{"from": "human", "value": prompt}]}]))
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({"5": {"answer": 0, "choices": ["cat", "eel", "owl"]},
                                    "7": {"answer": 2, "choices": ["cat", "eel", "owl"]}}))
    bench = bm.get("scienceqa")
    questions = bench.questions(questions_file)
    assert [q.question_id for q in questions] == ["5", "7"]
    assert questions[0].meta["num_options"] == 3 and not questions[0].text.startswith("<image>")
    refs = bench.references(problems, questions)
    assert bench.score({"5": "A", "7": "B"}, questions, refs)["score"] == 50.0
