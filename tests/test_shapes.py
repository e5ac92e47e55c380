import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import load_script
from PIL import Image

from mqt_jax.data.shapes import COLOURS, SHORT_ANSWER, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("s") / "shapes", num_train=30, num_eval=12, seed=3)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_and_formats(shapes):
    captions = json.loads((shapes / "shapes_captions.json").read_text())
    qa = json.loads((shapes / "shapes_qa.json").read_text())
    assert len(captions) == len(qa) == 30
    assert qa[0]["conversations"][0]["value"].startswith("<image>\n")
    assert [t["from"] for t in qa[0]["conversations"]] == ["human", "gpt"] * 6  # 5 QA + description
    assert sum(t["value"].endswith("Describe the image in detail.") for t in qa[0]["conversations"]) == 1
    questions, answers = read_jsonl(shapes / "eval/questions.jsonl"), read_jsonl(shapes / "eval/answers.jsonl")
    assert len(questions) == len(answers) == 12 * 5
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert {q["category"] for q in questions} == {"coarse", "fine"}
    assert "answer" not in questions[0]  # answers are kept separately
    assert (shapes / "tokenizer" / "tokenizer.model").is_file()
    assert not shapes.with_name("shapes.partial").exists()


def test_text_corpus_and_validation_split(shapes, tmp_path):
    """Stage 0's corpus is the training split's conversations without their images; the
    validation split is drawn apart from both the training and the held-out images, and
    leaves them as they are."""
    qa = json.loads((shapes / "shapes_qa.json").read_text())
    text = json.loads((shapes / "shapes_text.json").read_text())
    assert len(text) == len(qa) and all("image" not in r for r in text)
    for with_image, alone in zip(qa, text):
        values = [t["value"] for t in with_image["conversations"]]
        assert [t["value"] for t in alone["conversations"]] == [values[0].removeprefix("<image>\n"), *values[1:]]
    assert not any("<image>" in t["value"] for r in text for t in r["conversations"])
    val = read_jsonl(shapes / "val/questions.jsonl")
    assert len(val) == 200 * 5 and all(q["image"].startswith("val/") for q in val)
    assert len(read_jsonl(shapes / "val/answers.jsonl")) == len(val)
    train_pixels = {np.asarray(Image.open(p)).tobytes() for p in (shapes / "images/train").glob("*.png")}
    assert not any(np.asarray(Image.open(p)).tobytes() in train_pixels
                   for p in sorted((shapes / "images/val").glob("*.png"))[:20])
    fewer = write_shapes(tmp_path / "s", num_train=30, num_eval=12, seed=3, num_val=0, tfds=False)
    for name in ("eval/questions.jsonl", "eval/answers.jsonl", "shapes_qa.json"):
        assert (fewer / name).read_text() == (shapes / name).read_text()


def test_held_out_images_do_not_depend_on_the_training_size(shapes, tmp_path):
    """More training images extend the training split and leave the held-out and validation
    splits as they are (the same questions scored whatever the training set)."""
    more = write_shapes(tmp_path / "more", num_train=40, num_eval=12, seed=3, num_val=3, tfds=False)
    for name in ("eval/questions.jsonl", "eval/answers.jsonl", "images/eval/000011.png",
                 "images/val/000002.png", "images/train/000029.png"):
        assert (more / name).read_bytes() == (shapes / name).read_bytes(), name
    qa, more_qa = (json.loads((d / "shapes_qa.json").read_text()) for d in (shapes, more))
    assert more_qa[:30] == qa and len(more_qa) == 40
    held_out = {(shapes / "images/eval" / f"{k:06d}.png").read_bytes() for k in range(12)}
    assert not any((more / "images/train" / f"{k:06d}.png").read_bytes() in held_out for k in range(40))


def test_fine_answers_match_the_pixels(shapes):
    questions = read_jsonl(shapes / "eval/questions.jsonl")
    answers = {a["question_id"]: a["answer"] for a in read_jsonl(shapes / "eval/answers.jsonl")}
    checked = 0
    for q in questions:
        if q["text"].startswith("What colour is the shape in row"):
            row, col = (int(x) for x in q["text"].split("row ")[1].split("?")[0].split(", column "))
            image = np.asarray(Image.open(shapes / "images" / q["image"]))
            cell = image.shape[0] / 3
            centre = image[int((row - 0.5) * cell), int((col - 0.5) * cell)]
            assert tuple(centre) == COLOURS[answers[q["question_id"]]], q
            checked += 1
        if q["text"].startswith("How many shapes"):
            image = np.asarray(Image.open(shapes / "images" / q["image"]))
            cell = image.shape[0] / 3
            occupied = sum(tuple(image[int((r + 0.5) * cell), int((c + 0.5) * cell)]) != (255, 255, 255)
                           for r in range(3) for c in range(3))
            assert str(occupied) == answers[q["question_id"]]
            checked += 1
    assert checked == 24


def test_deterministic_from_the_seed(shapes, tmp_path):
    again = write_shapes(tmp_path / "again", num_train=30, num_eval=12, seed=3)
    other = write_shapes(tmp_path / "other", num_train=30, num_eval=12, seed=4)
    for name in ("shapes_qa.json", "eval/answers.jsonl", "images/train/000007.png"):
        assert (again / name).read_bytes() == (shapes / name).read_bytes()
    assert (other / "shapes_qa.json").read_bytes() != (shapes / "shapes_qa.json").read_bytes()


def test_cli_refuses_to_overwrite(shapes):
    out = subprocess.run([sys.executable, "-m", "mqt_jax.cli", "data", "shapes", "--out", str(shapes)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "exists" in out.stderr


def test_tfds_route_gives_the_same_examples(shapes):
    from mqt_jax.config import DataConfig, MSampler
    from mqt_jax.data.pipeline import ExampleBuilder
    from mqt_jax.data.shapes_tfds import TfdsRecords

    records = TfdsRecords(str(shapes / "tfds"), "qa")  # written with the LLaVA files
    raw = {r["id"]: r for r in json.loads((shapes / "shapes_qa.json").read_text())}
    assert len(records) == len(raw)
    common = dict(tokenizer_dir=str(shapes / "tokenizer"), image_root=str(shapes / "images"))
    from_tfds = ExampleBuilder(DataConfig(**common), 16, 64, MSampler(), seed=0)
    from_json = ExampleBuilder(DataConfig(**common), 16, 64, MSampler(), seed=0)
    for index in range(len(records)):
        record = records[index]
        original = raw[record["id"]]
        assert record["conversations"] == original["conversations"]
        a, b = from_tfds(0, record), from_json(0, original)
        assert a["example"] == b["example"]
        np.testing.assert_array_equal(a["image"], b["image"])


def _visual_reading():
    return load_script("visual_reading")


def test_visual_reading_labels_match_the_written_captions(shapes):
    """The probe rebuilds each image's cells from the seed: they must be the captions' cells."""
    import re

    vr = _visual_reading()
    captions = json.loads((shapes / "shapes_captions.json").read_text())
    for index, record in enumerate(captions):
        text = record["conversations"][1]["value"]
        want = np.zeros((2, 9), int)
        for r, c, colour, kind in re.findall(r"row (\d), column (\d): a \w+ (\w+) (\w+)", text):
            cell = 3 * (int(r) - 1) + int(c) - 1
            want[:, cell] = [list(COLOURS).index(colour) + 1, ["circle", "square", "triangle"].index(kind) + 1]
        np.testing.assert_array_equal(vr.cell_labels(index, seed=3), want)


def test_visual_reading_rebuilds_the_written_validation_questions(tmp_path):
    """Table 3 asks the validation questions again, as text: they and their answers must be
    the ones write_shapes wrote, and the description turn holds the image's caption."""
    vr = _visual_reading()
    out = write_shapes(tmp_path / "s", num_train=3, num_eval=2, num_val=4, seed=5, tfds=False)
    questions, answers = read_jsonl(out / "val" / "questions.jsonl"), read_jsonl(out / "val" / "answers.jsonl")
    rebuilt = [t for n in range(4) for t in vr.val_questions(n, seed=5)[1]]
    assert [(k, q + "\n" + SHORT_ANSWER, a) for k, q, a in rebuilt] == [
        (a["type"], q["text"], a["answer"]) for q, a in zip(questions, answers)]
    shapes, _ = vr.val_questions(0, seed=5)
    turns = vr.text_turns(shapes, "How many shapes are there?", "3", described=True)
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[1]["value"].startswith(f"{len(shapes)} shape") and turns[3]["value"] == "3"
    assert len(vr.text_turns(shapes, "q", "a", described=False)) == 2
    inside = vr.text_turns(shapes, "q", "a", described=True, layout="question")
    assert [t["value"] for t in inside] == [
        f"The picture: {turns[1]['value']}\nq\n{SHORT_ANSWER}", "a"]


def test_visual_reading_ridge_probe_separates_what_is_separable():
    vr = _visual_reading()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    x = np.eye(3)[labels] @ rng.normal(size=(3, 40)) + 0.1 * rng.normal(size=(300, 40))
    assert vr.ridge_accuracy(x[:200], labels[:200], x[200:], labels[200:], 3) == 1.0
    noise = rng.normal(size=(300, 40))  # features that carry nothing: about chance
    assert vr.ridge_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], 3) < 0.5


def test_where_and_count_questions_match_the_pixels_and_leave_the_five_unchanged(shapes, tmp_path):
    """"Which row / column is the red triangle in?": the named colour sits at the centre of a
    cell in the answered row (column); "How many red shapes?": that many cell centres are red.
    The five default questions are drawn first, so asking more types leaves them as they were."""
    types = ("has_colour", "count", "colour_at", "shape_at", "count_kind", "row_of", "column_of",
             "count_colour", "count_shape")
    out = write_shapes(tmp_path / "where", num_train=30, num_eval=12, seed=3, num_val=0,
                       tfds=False, question_types=types)
    questions, answers = read_jsonl(out / "eval/questions.jsonl"), read_jsonl(out / "eval/answers.jsonl")
    default = read_jsonl(shapes / "eval/answers.jsonl")
    assert [a for a in answers if a["type"] in types[:5]] == default
    checked = 0
    for q, a in zip(questions, answers):
        image = np.asarray(Image.open(out / "images" / q["image"]))
        cell = image.shape[0] / 3
        centres = [tuple(image[int((r + 0.5) * cell), int((c + 0.5) * cell)])
                   for r in range(3) for c in range(3)]
        if a["type"] == "count_colour":  # "How many red shapes are there?"
            colour = q["text"].split()[2]
            assert centres.count(COLOURS[colour]) == int(a["answer"]), (q, a)
            checked += 1
        if a["type"] not in ("row_of", "column_of"):
            continue
        colour = q["text"].split(" is the ")[1].split()[0]
        places = {(r if a["type"] == "row_of" else c) + 1 for r in range(3) for c in range(3)
                  if tuple(image[int((r + 0.5) * cell), int((c + 0.5) * cell)]) == COLOURS[colour]}
        if a["answer"] != "none":  # the named colour is in the answered line
            assert str(int(a["answer"])) == a["answer"] and int(a["answer"]) in places, (q, a, places)
        checked += 1
    assert checked == 36 and {a["answer"] for a in answers if a["type"] == "row_of"} <= {"1", "2", "3", "none"}
    with pytest.raises(ValueError, match="question types \\['size_at'\\]"):
        write_shapes(tmp_path / "bad", num_train=2, num_eval=1, question_types=("count", "size_at"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_more_questions_per_training_image_without_the_description(shapes, tmp_path):
    """A training conversation asks `questions_per_image` distinct questions (a repeat would be
    answered by copying), the default's five among them with their answers, the extra ones
    true of the pixels; the scored questions of every split stay exactly the default's."""
    out = write_shapes(tmp_path / "more", num_train=30, num_eval=12, seed=3, num_val=0,
                       tfds=False, questions_per_image=12, describe=False)
    for split in ("eval", "train"):
        for name in ("questions", "answers"):
            assert read_jsonl(out / split / f"{name}.jsonl") == read_jsonl(shapes / split / f"{name}.jsonl")
    default = {r["id"]: r for r in json.loads((shapes / "shapes_qa.json").read_text())}
    counts = []
    for record in json.loads((out / "shapes_qa.json").read_text()):
        turns = record["conversations"]
        asked = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        assert len(set(asked)) == len(asked) and all(SHORT_ANSWER in q for q in asked)
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(asked[1:])
        counts.append(len(asked))
        # The five scored questions are among them, with the same answers.
        said = dict(zip(asked, [t["value"] for t in turns[1::2]]))
        for q, a in zip(default[record["id"]]["conversations"][::2], default[record["id"]]["conversations"][1::2]):
            q = q["value"].removeprefix("<image>\n")
            if not q.startswith("Describe"):
                assert said[q] == a["value"]
        image = np.asarray(Image.open(out / "images" / record["image"]))
        cell = image.shape[0] / 3
        centres = [tuple(image[int((r + 0.5) * cell), int((c + 0.5) * cell)]) for r in range(3) for c in range(3)]
        for q, a in said.items():  # every extra "Is there a red shape?" against the pixels
            if q.startswith("Is there a "):
                assert (COLOURS[q.split()[3]] in centres) == (a == "yes"), (q, a)
    text = json.loads((out / "shapes_text.json").read_text())  # stage 0 still learns the captions
    assert [r["conversations"][-1]["value"] for r in text] == [
        r["conversations"][1]["value"] for r in json.loads((out / "shapes_captions.json").read_text())]
    # At most 1 + 5 + 9 + 9 + 30 distinct questions exist; a scene of one shape has fewer than 12.
    assert max(counts) == 12 and np.mean(counts) > 11
    with pytest.raises(ValueError, match="questions_per_image=3"):
        write_shapes(tmp_path / "few", num_train=2, num_eval=1, questions_per_image=3)


def test_visual_reading_distinctness_hand_computed():
    vr = _visual_reading()
    same = np.tile(np.array([[[3.0, 4.0]]]), (2, 3, 1))  # every token of an image alike
    cosine, apart, common = vr.distinctness(same)
    assert cosine == pytest.approx(1.0) and apart == 0.0 and common == pytest.approx(np.sqrt(12.5))
    orthogonal = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # mean (0.5, 0.5); each 0.5 away per axis
    cosine, apart, common = vr.distinctness(orthogonal)
    assert cosine == pytest.approx(0.0) and apart == pytest.approx(0.5) and common == pytest.approx(0.5)
