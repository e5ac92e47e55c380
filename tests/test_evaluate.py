import pytest

from mqt_jax.evaluate import EvalConfig, accuracy, majority_baseline, m_values_for, markdown_table, normalize

ANSWERS = [
    {"question_id": "a", "answer": "yes", "category": "coarse", "type": "has"},
    {"question_id": "b", "answer": "yes", "category": "coarse", "type": "has"},
    {"question_id": "c", "answer": "no", "category": "coarse", "type": "has"},
    {"question_id": "d", "answer": "red", "category": "fine", "type": "colour"},
    {"question_id": "e", "answer": "blue", "category": "fine", "type": "colour"},
    {"question_id": "f", "answer": "Red", "category": "fine", "type": "colour"},
    {"question_id": "g", "answer": "0", "category": "fine", "type": "count"},
]


def test_normalize():
    assert normalize("  Red. ") == "red"
    assert normalize("two\n  squares") == "two squares"
    assert normalize("yes") != normalize("no")


def test_accuracy_by_hand():
    predictions = {"a": "Yes.", "b": "no", "c": "no", "d": "red", "e": "red", "f": "red"}  # g missing
    acc = accuracy(predictions, ANSWERS)
    assert acc == {"all": 4 / 7, "coarse": 2 / 3, "fine": 2 / 4}


def test_majority_baseline_by_hand():
    # per type: has -> "yes" (2 of 3), colour -> "red" (2 of 3, "Red" normalised), count -> "0"
    assert majority_baseline(ANSWERS) == {"all": 5 / 7, "coarse": 2 / 3, "fine": 3 / 4}


def test_m_values_are_capped_at_M_and_include_it():
    assert m_values_for(EvalConfig(m_values=(1, 4, 36, 64, 144)), 36) == [1, 4, 36]
    assert m_values_for(EvalConfig(m_values=(2,)), 16) == [2, 16]
    with pytest.raises(ValueError, match=r"m=\[0\] outside \[1, 16\]"):
        m_values_for(EvalConfig(m_values=(0, 2)), 16)


def test_markdown_table():
    table = markdown_table({"accuracy": {1: {"all": 0.25, "fine": 0.5}, 4: {"all": 1.0, "fine": 1.0}},
                            "majority_baseline": {"all": 0.5, "fine": 0.125}})
    assert table.splitlines() == [
        "| m | all | fine |", "|---|---|---|", "| 1 | 25.0 | 50.0 |", "| 4 | 100.0 | 100.0 |",
        "| majority baseline | 50.0 | 12.5 |"]
