"""mqt_jax/evaluation/benchmarks/mme.py: its official scoring on hand-computed cases, and its file
formats."""


from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import mme as this
from mqt_jax.evaluation.benchmarks.base import Question


def test_mme_accuracy_plus_and_totals():
    # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50 -> 125
    # code_reasoning: image 3 both wrong -> 0
    questions = [Question(q, "q", img, {"category": cat}) for q, img, cat in [
        ("1a", "1.jpg", "existence"), ("1b", "1.jpg", "existence"), ("2a", "2.jpg", "existence"),
        ("2b", "2.jpg", "existence"), ("3a", "3.jpg", "code_reasoning"), ("3b", "3.jpg", "code_reasoning")]]
    refs = {q.question_id: {"answer": a} for q, a in zip(questions, ["Yes", "No"] * 3)}
    predictions = {"1a": "Yes", "1b": "No, it is not", "2a": "Yes", "2b": "Yes", "3a": "No", "3b": "maybe"}
    result = bm.get("mme").score(predictions, questions, refs)
    assert result["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert result["code_reasoning"]["score"] == 0.0
    assert result["perception"] == 125.0 and result["cognition"] == 0.0 and result["score"] == 125.0
    files = bm.get("mme").submission(predictions, questions, refs, 1)
    assert files["mme/existence.txt"].splitlines()[1] == "1.jpg\tq\tNo\tNo, it is not"


def test_mme_parsing():
    assert [this.mme_answer(t) for t in ("Yes", "no.", "Yes, it is", "Not really", "Maybe")] == [
        "yes", "no", "yes", "no", "other"]
