"""scripts/recipe_loop.py's tables, on answer files written by hand."""

import json

from helpers import load_script


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_per_type_accuracy_kind_share_and_majority_by_hand(tmp_path):
    refs = [{"question_id": "a", "answer": "3", "type": "count"},
            {"question_id": "b", "answer": "3", "type": "count"},
            {"question_id": "c", "answer": "5", "type": "count"},
            {"question_id": "d", "answer": "red", "type": "colour_at"},
            {"question_id": "e", "answer": "blue", "type": "colour_at"}]
    write_jsonl(tmp_path / "answers.jsonl", refs)
    said = {1: {"a": "3", "b": "yes", "c": "3", "d": "Red", "e": "red"},
            4: {"a": "3", "b": "3", "c": "5", "d": "red", "e": "green"}}
    for m, texts in said.items():
        write_jsonl(tmp_path / f"answers_m{m}.jsonl",
                    [{"question_id": q, "text": t} for q, t in texts.items()])
    m_values, table, majority = load_script("recipe_loop").per_type(tmp_path, tmp_path / "answers.jsonl")
    assert m_values == [1, 4]
    # m = 1: count right 1 of 3 ("yes" is no count's answer: 2 of 3 of its kind); colour
    # right 1 of 2 (case ignored), both answers colours the references use.
    acc, _, kind = table["count"][1]
    assert round(acc, 1) == 33.3 and round(kind, 1) == 66.7
    assert table["colour_at"][1][0] == 50.0 and table["colour_at"][1][2] == 100.0
    # m = 4: every count right; "green" is a colour, but not one the references use.
    assert table["count"][4][0] == 100.0 and table["colour_at"][4][2] == 50.0
    assert round(majority["count"][0], 1) == 66.7 and majority["count"][1] == 3
