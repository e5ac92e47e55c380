"""mqt_jax/evaluation/benchmarks/vizwiz.py: its official scoring on hand-computed cases, and its file
formats."""

import json

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks.base import Question


def test_vizwiz_matches_annotations_by_image_and_scores_unanswerable(tmp_path):
    refs = tmp_path / "val.json"
    refs.write_text(json.dumps([
        {"image": "VizWiz_val_1.jpg", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_2.jpg", "answers": [{"answer": "coke"}] * 10}]))
    questions = [Question("0", "q", "VizWiz_val_1.jpg"), Question("1", "q", "VizWiz_val_2.jpg")]
    bench = bm.get("vizwiz")
    loaded = bench.references(refs, questions)
    assert bench.score({"0": "Unanswerable", "1": "pepsi"}, questions, loaded)["score"] == 50.0
    upload = json.loads(bench.submission({"0": "Unanswerable", "1": "Coke."}, questions, loaded, 4)
                        ["vizwiz_answers_upload.json"])
    assert upload == [{"image": "VizWiz_val_1.jpg", "answer": "unanswerable"},
                      {"image": "VizWiz_val_2.jpg", "answer": "coke"}]
