"""mqt_jax/evaluation/benchmarks/pope.py: its official scoring on hand-computed cases, and its file
formats."""

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import pope as this
from mqt_jax.evaluation.benchmarks.base import Question


@pytest.mark.parametrize("text,yes", [("Yes, there is.", True), ("No.", False),
                                      ("There is not a dog", False), ("yes", True),
                                      ("Yes. No doubt", True)])  # the first sentence decides
def test_pope_parsing(text, yes):
    assert this.pope_yes(text) == yes


def test_pope_metrics_by_hand(tmp_path):
    # split "random": gold yes yes no no; predicted yes no yes no -> TP 1 FP 1 TN 1 FN 1
    # split "popular": gold yes no; predicted yes no -> all right
    questions = [Question(str(i), "q", "x.jpg", {"category": c})
                 for i, c in enumerate(["random"] * 4 + ["popular"] * 2)]
    refs = {str(i): {"label": g} for i, g in enumerate(["yes", "yes", "no", "no", "yes", "no"])}
    predictions = dict(enumerate(["Yes", "No", "Yes", "No", "Yes", "No"]))
    predictions = {str(k): v for k, v in predictions.items()}
    result = bm.get("pope").score(predictions, questions, refs)
    assert result["random"] == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0,
                                "yes_ratio": 50.0}
    assert result["popular"]["f1"] == 100.0 and result["popular"]["yes_ratio"] == 50.0
    assert result["score"] == 75.0  # mean F1 over splits
