"""The benchmarks' official scoring on hand-computed cases, and their file formats."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


# ------------------------------------------------------------------------ VQA family
@pytest.mark.parametrize("raw,want", [
    ("Two", "2"),  # number words
    ("the dog", "dog"),  # articles
    ("a cat and an owl", "cat and owl"),
    ("Yes.", "yes"),  # a period not in a number
    ("3.5", "3.5"),  # ... kept in one
    ("1,000", "1000"),  # digit-separating comma
    ("dont", "don't"),  # contractions restored
    ("red-white", "red white"),  # punctuation without spaces becomes a space
    ("red - white", "red white"),  # ... next to a space it is dropped
    ("Whats up?", "what's up"),
    ("man's hat", "man 's hat"),
    ("  New\nYork ", "new york"),
])
def test_vqa_normalize(raw, want):
    assert bm.vqa_normalize(raw) == want


@pytest.mark.parametrize("matches,want", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # left out: 0 matches; kept in: 1 of 3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9
    (4, 1.0),  # any 9 still hold 3 matches
    (10, 1.0),
])
def test_vqa_score_averages_the_ten_leave_one_out_subsets(matches, want):
    humans = ["two"] * matches + ["three"] * (10 - matches)
    assert bm.vqa_score("2", humans) == pytest.approx(want)


def test_vqav2_scores_and_writes_the_upload_format(tmp_path):
    refs = tmp_path / "annotations.json"
    refs.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8}]}))
    questions = qs(1, 2)
    bench = bm.get("vqav2")
    loaded = bench.references(refs, questions)
    result = bench.score({"1": "Yes", "2": "two"}, questions, loaded)
    assert result["score"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    upload = json.loads(bench.submission({"1": "Yes", "2": "two"}, questions, loaded, 4)["answers_upload.json"])
    assert upload == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}]


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


def test_textvqa_reads_its_data_list(tmp_path):
    refs = tmp_path / "TextVQA_0.5.1_val.json"
    refs.write_text(json.dumps({"data": [{"question_id": 7, "answers": ["Nokia"] * 3 + ["nokia 3"] * 7}]}))
    bench = bm.get("textvqa")
    loaded = bench.references(refs, qs(7))
    assert bench.score({"7": "nokia"}, qs(7), loaded)["score"] == pytest.approx(90.0)


def test_missing_reference_is_named(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"question_id": "1", "answers": ["a"] * 10}) + "\n")
    with pytest.raises(ValueError, match="no reference answer for 1 questions .first: '2'"):
        bm.get("vqav2").references(refs, qs(1, 2))


# --------------------------------------------------------------------- exact match
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


# ------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("prediction,want", [
    ("B", "B"), ("B. a cat", "B"), ("The answer is C.", "C"), ("E", None), ("I think so", None),
    ("The answer is A. The answer is B.", None),  # two answers: none
])
def test_scienceqa_letter_parsing(prediction, want):
    assert bm.letter_of(prediction, 4) == want


def test_scienceqa_reads_llava_conversations_and_problems(tmp_path):
    questions_file = tmp_path / "llava_test_CQM-A.json"
    prompt = "<image>\nContext: x\nWhich is a mammal?\nA. cat\nB. eel\nC. owl\n" + bm.LETTER_ANSWER
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


@pytest.mark.parametrize("response,want", [
    ("(B)", "B"),
    ("The answer is (C) because", "C"),
    ("A", "A"),
    ("I would say D is right", "D"),
    ("The correct one is clearly the small red square here", "B"),  # by option text
    ("Both (A) and then (C)", "C"),  # several: the last mentioned
])
def test_mmmu_multiple_choice_parsing(response, want):
    assert bm.mmmu_choice(response, ["blue circle", "small red square", "green", "tree"], "q1") == want


def test_mmmu_unparseable_answer_is_a_seeded_random_choice():
    picks = {bm.mmmu_choice("no idea", ["x", "y", "z", "w"], "question 9") for _ in range(5)}
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


# ----------------------------------------------------------------------- POPE, MME
@pytest.mark.parametrize("text,yes", [("Yes, there is.", True), ("No.", False),
                                      ("There is not a dog", False), ("yes", True),
                                      ("Yes. No doubt", True)])  # the first sentence decides
def test_pope_parsing(text, yes):
    assert bm.pope_yes(text) == yes


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
    assert [bm.mme_answer(t) for t in ("Yes", "no.", "Yes, it is", "Not really", "Maybe")] == [
        "yes", "no", "yes", "no", "other"]


# --------------------------------------------------------------------------- MMBench
def mmbench_tsv(path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
            ["10", "Colour?", "nan", "red", "green", "blue", "nan", "A", "colour", image],
            ["11", "Shape?", "A hint", "circle", "square", "nan", "nan", "B", "shape", image]]
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def test_mmbench_rotates_options_and_scores_circularly(tmp_path):
    mmbench_tsv(tmp_path / "mmbench_dev.tsv")
    bench = bm.get("mmbench")
    questions = bench.questions(tmp_path / "mmbench_dev.tsv")
    assert [q.question_id for q in questions] == ["10_r0", "10_r1", "10_r2", "11_r0", "11_r1"]
    assert questions[1].text == "Colour?\nA. green\nB. blue\nC. red\n" + bm.LETTER_ANSWER
    assert [q.meta["answer"] for q in questions] == ["A", "C", "B", "B", "A"]
    assert questions[3].text.startswith("A hint\nShape?\nA. circle")
    assert np.asarray(questions[0].image).shape == (8, 8, 3)
    refs = bench.references(None, questions)
    # question 10 right in every rotation; question 11 right in round 0 only
    predictions = {"10_r0": "A", "10_r1": "C", "10_r2": "B.", "11_r0": "B", "11_r1": "B"}
    result = bench.score(predictions, questions, refs)
    assert result["score"] == 50.0 and result["single_round"] == 100.0
    assert result["category/colour"] == 100.0 and result["category/shape"] == 0.0
    tsv = bench.submission(predictions, questions, refs, 1)["mmbench_predictions.tsv"].splitlines()
    assert tsv[2].split("\t")[0] == "1000010" and tsv[2].split("\t")[-2] == "C"


# --------------------------------------------------------------- judged elsewhere
def test_judged_benchmarks_write_upstream_formats_and_no_score():
    questions = [Question("v1_0", "What is it?", "v1_0.png")]
    assert bm.get("mmvet").references(None, questions) == {}  # nothing to read
    assert bm.get("mmvet").score({"v1_0": "a cat"}, questions, {}) == {}
    assert json.loads(bm.get("mmvet").submission({"v1_0": "a cat"}, questions, {}, 4)
                      ["mmvet_results.json"]) == {"v1_0": "a cat"}
    row = json.loads(bm.llava_answers({"v1_0": "a cat"}, questions, 4))
    assert row["question_id"] == "v1_0" and row["text"] == "a cat" and row["prompt"] == "What is it?"
    assert row["metadata"] == {"m": 4}


def test_unknown_benchmark_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="benchmark 'vqa3'"):
        bm.get("vqa3")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="q.jsonl:2: not JSON"):
        bm.llava_questions(bad)
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match=r"lacks \['text'\]"):
        bm.llava_questions(bad)


@pytest.mark.parametrize("text,want", [("B", "B"), ("B.", "B"), ("(C) blue", "C"),
                                       ("It is green", "B"), ("A or B", None), ("pink", None)])
def test_mmbench_letter_inference(text, want):
    assert bm.mmbench_letter(text, ["red", "green", "blue"]) == want
