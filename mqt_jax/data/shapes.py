"""Shapes-VQA: a procedural LLaVA-format dataset, deterministic from a seed (the default data).

Each image is a grid whose cells may hold a shape (circle / square / triangle, small / large,
one of five colours). Coarse questions are answerable at a glance ("Is there a red shape?",
"How many shapes are there?"); fine questions need one cell's detail ("What colour is the
shape in row 2, column 3?", "How many small blue triangles are there?"), so accuracy should
rise with the number of visual tokens.

Written as: images/{train,val,eval}/NNNNNN.png; shapes_captions.json (stage 1) and
shapes_qa.json (stage 2), LLaVA training files; shapes_text.json (the same training split's
captions, questions and answers without images: stage 0's language-model corpus);
eval/questions.jsonl and eval/answers.jsonl (LLaVA's question-file / answer-file form), and
val/ in the same form: a validation split drawn like the training images (for choosing a
recipe; the held-out eval split is never used for that); train/ in the same form: the training
images' questions (what the m router learns from); tokenizer/tokenizer.model
(sentencepiece, trained here); tfds/ (the same records as a TFDS ArrayRecord dataset, see
shapes_tfds.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mqt_jax.data.conversation import VICUNA_SYSTEM
from mqt_jax.data.tokenizer import train_sentencepiece

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (225, 195, 30), "purple": (140, 60, 170)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image."
DESCRIBE_PROMPT = "Describe the image in detail."


@dataclasses.dataclass(frozen=True)
class Shape:
    row: int  # 1-based, as the questions say it
    col: int
    kind: str
    colour: str
    size: str

    def phrase(self) -> str:
        # Where first, then what: the attributes are predicted knowing which cell to look at.
        return f"row {self.row}, column {self.col}: a {self.size} {self.colour} {self.kind}"


def random_scene(rng: np.random.Generator, grid: int = 3, fill: float = 0.6) -> list[Shape]:
    shapes = [
        Shape(r + 1, c + 1, str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))),
              str(rng.choice(SIZES)))
        for r in range(grid) for c in range(grid) if rng.random() < fill
    ]
    if not shapes:  # never an empty picture
        shapes = [Shape(1, 1, SHAPES[0], "red", "large")]
    return shapes


def draw(shapes: list[Shape], image_size: int, grid: int = 3) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    cell = image_size / grid
    for s in shapes:
        cx, cy = (s.col - 0.5) * cell, (s.row - 0.5) * cell
        r = cell * (0.42 if s.size == "large" else 0.22)
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=colour)
        elif s.kind == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def caption(shapes: list[Shape]) -> str:
    count = f"{len(shapes)} shape" + ("s" if len(shapes) != 1 else "")
    return f"{count}: " + "; ".join(s.phrase() for s in shapes) + "."


QUESTION_TYPES = ("has_colour", "count", "colour_at", "shape_at", "count_kind")
# Questions that name a shape by what it is and ask where it is: the model finds it by content
# (what attention does well) and must read its place, which one pooled token mostly loses.
WHERE_TYPES = ("row_of", "column_of")
# Counts by one attribute: one pooled token mixes small and large shapes' areas, so exact
# counts need the shapes apart.
COUNT_TYPES = ("count_colour", "count_shape")


def questions(shapes: list[Shape], rng: np.random.Generator,
              types: tuple[str, ...] = QUESTION_TYPES) -> list[tuple[str, str, str]]:
    """(question, answer, category) triples, one per type of `types`, in that order. The five
    QUESTION_TYPES draw from `rng` first (the same questions whatever else is asked)."""
    colour = str(rng.choice(list(COLOURS)))
    present = any(s.colour == colour for s in shapes)
    pick = shapes[rng.integers(len(shapes))]
    size, kind, hue = str(rng.choice(SIZES)), str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    count = sum(s.size == size and s.kind == kind and s.colour == hue for s in shapes)
    made = {
        "has_colour": (f"Is there a {colour} shape?", "yes" if present else "no", "coarse"),
        "count": ("How many shapes are there?", str(len(shapes)), "coarse"),
        "colour_at": (f"What colour is the shape in row {pick.row}, column {pick.col}?",
                      pick.colour, "fine"),
        "shape_at": (f"What shape is in row {pick.row}, column {pick.col}?", pick.kind, "fine"),
        "count_kind": (f"How many {size} {hue} {kind}s are there?", str(count), "fine"),
    }
    for t in WHERE_TYPES:
        if t in types:
            made[t] = where_question(shapes, rng, "row" if t == "row_of" else "column")
    if "count_colour" in types:
        hue = str(rng.choice(list(COLOURS)))
        made["count_colour"] = (f"How many {hue} shapes are there?",
                                str(sum(s.colour == hue for s in shapes)), "fine")
    if "count_shape" in types:
        kind = str(rng.choice(SHAPES))
        made["count_shape"] = (f"How many {kind}s are there?",
                               str(sum(s.kind == kind for s in shapes)), "fine")
    unknown = [t for t in types if t not in made]
    if unknown:
        raise ValueError(f"question types {unknown}: expected some of "
                         f"{QUESTION_TYPES + WHERE_TYPES + COUNT_TYPES}")
    return [made[t] for t in types]


def more_questions(shapes: list[Shape], rng: np.random.Generator, types: tuple[str, ...],
                   asked: list[tuple[str, str, str]], count: int) -> list[tuple[str, str, str]]:
    """Up to `count` further questions of `types` about one image, none already in `asked`
    (a repeated question would be answered by copying the earlier answer, not by looking)."""
    seen, more = {q for q, _, _ in asked}, []
    for _ in range(8 * count):
        for qa in questions(shapes, rng, types):
            if len(more) < count and qa[0] not in seen:
                seen.add(qa[0])
                more.append(qa)
        if len(more) == count:
            break
    return more


def where_question(shapes: list[Shape], rng: np.random.Generator, axis: str) -> tuple[str, str, str]:
    """"Which row is the red triangle in?": a colour and kind whose shapes all lie in one row
    (or column), so the answer is one number; in the rare scene without one, a colour and kind
    it does not hold, answered "none"."""
    where = {}
    for s in shapes:
        where.setdefault((s.colour, s.kind), set()).add(s.row if axis == "row" else s.col)
    fine = sorted(k for k, places in where.items() if len(places) == 1)
    if fine:
        colour, kind = fine[rng.integers(len(fine))]
        answer = str(next(iter(where[(colour, kind)])))
    else:
        absent = sorted((c, k) for c in COLOURS for k in SHAPES if (c, k) not in where)
        (colour, kind), answer = absent[rng.integers(len(absent))], "none"
    return f"Which {axis} is the {colour} {kind} in?", answer, "fine"


def qa_record(image: str, record_id: str, qas) -> dict:
    conversations = []
    for i, (question, answer, category) in enumerate(qas):
        text = question if category == "description" else f"{question}\n{SHORT_ANSWER}"
        conversations += [{"from": "human", "value": ("<image>\n" + text) if i == 0 else text},
                          {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": conversations}


# Each image is drawn from its own seed index, so a split's images do not depend on the size
# of the others: held-out image k is index EVAL_INDEX + k whatever num_train is (the same
# 1,500 questions for every training set), validation image k is VAL_INDEX + k, and training
# image k is k, or TRAIN_INDEX + k from EVAL_INDEX on.
EVAL_INDEX = 2_000
VAL_INDEX = 1_000_000
TRAIN_INDEX = 2_000_000


def scene_index(split: str, number: int) -> int:
    """The seed index of image `number` of a split ("train", "val" or "eval")."""
    if split == "eval":
        return EVAL_INDEX + number
    if split == "val":
        return VAL_INDEX + number
    return number if number < EVAL_INDEX else TRAIN_INDEX + number


def write_shapes(out: str | os.PathLike, num_train: int = 2000, num_eval: int = 300,
                 seed: int = 0, image_size: int = 64, vocab_size: int = 512,
                 tfds: bool = True, num_val: int = 200,
                 question_types: tuple[str, ...] = (), questions_per_image: int = 0,
                 describe: bool = True) -> Path:
    """Generate the dataset into `out` (built under a temporary name, then renamed);
    `question_types` empty: QUESTION_TYPES. A training conversation asks
    `questions_per_image` distinct questions (0: one of each type, the ones scored) and, with
    `describe`, asks for a detailed description too; the scored questions of every split are
    one of each type whatever these are."""
    out, question_types = Path(out), tuple(question_types) or QUESTION_TYPES
    questions([Shape(1, 1, "circle", "red", "small")], np.random.default_rng(0),
              question_types)  # unknown types fail here, before any image is drawn
    if questions_per_image and questions_per_image < len(question_types):
        raise ValueError(f"questions_per_image={questions_per_image}: at least one of each of the "
                         f"{len(question_types)} question types (or 0)")
    if num_train < 1 or num_eval < 1 or num_val < 0:
        raise ValueError(f"num_train={num_train} and num_eval={num_eval} must be >= 1, "
                         f"num_val={num_val} >= 0")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: the 3 x 3 grid of shapes needs at least 16 px")
    if num_eval > VAL_INDEX - EVAL_INDEX or num_val > TRAIN_INDEX - VAL_INDEX:
        raise ValueError(f"num_eval={num_eval} and num_val={num_val}: at most "
                         f"{VAL_INDEX - EVAL_INDEX} and {TRAIN_INDEX - VAL_INDEX}")
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)

    def _fill():
        (tmp / "images" / "train").mkdir(parents=True)
        (tmp / "images" / "eval").mkdir(parents=True)
        (tmp / "images" / "val").mkdir(parents=True)
        (tmp / "eval").mkdir()
        (tmp / "val").mkdir()
        (tmp / "train").mkdir()
        # The system prompt opens every stage-2 example: weight it so it tokenises compactly.
        captions, qa, text_only, texts = [], [], [], [VICUNA_SYSTEM] * 200
        scored = {"eval": ([], []), "val": ([], []), "train": ([], [])}  # questions, answers
        images = [("train", k) for k in range(num_train)] + [("eval", k) for k in range(num_eval)] \
            + [("val", k) for k in range(num_val)]
        for split, number in tqdm(images, desc="shapes-vqa", unit="image"):
            rng = np.random.default_rng([seed, scene_index(split, number)])
            shapes = random_scene(rng)
            image = f"{split}/{number:06d}.png"
            draw(shapes, image_size).save(tmp / "images" / image)
            qas = questions(shapes, rng, question_types)
            if split == "train":
                captions.append({"id": f"cap{number:06d}", "image": image, "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": caption(shapes)}]})
                # In a random order (evaluation asks each question first, on its own), with a
                # detailed-description turn as LLaVA-Instruct's conversations have (`describe`).
                turns = qas + more_questions(shapes, rng, question_types, qas,
                                             max(questions_per_image - len(qas), 0))
                turns += [(DESCRIBE_PROMPT, caption(shapes), "description")] if describe else []
                record = qa_record(image, f"qa{number:06d}", [turns[i] for i in rng.permutation(len(turns))])
                qa.append(record)
                # The text alone (no image placeholder), with the description either way: stage 0's
                # language model must know the captions' language that stage 1 trains on.
                first, *rest = record["conversations"] + ([] if describe else [
                    {"from": "human", "value": DESCRIBE_PROMPT}, {"from": "gpt", "value": caption(shapes)}])
                text_only.append({"id": f"txt{number:06d}", "conversations": [
                    {**first, "value": first["value"].removeprefix("<image>\n")}, *rest]})
                texts += [caption(shapes)] + [f"USER: {q}\n{SHORT_ANSWER} ASSISTANT: {a}" for q, a, _ in qas]
            questions_, answers = scored[split]
            for k, (question, answer, category) in enumerate(qas):
                qid = f"{number:06d}_{k}"
                questions_.append({"question_id": qid, "image": image, "category": category,
                                   "text": f"{question}\n{SHORT_ANSWER}"})
                answers.append({"question_id": qid, "answer": answer, "category": category,
                                "type": question_types[k]})
        (tmp / "shapes_captions.json").write_text(json.dumps(captions))
        (tmp / "shapes_qa.json").write_text(json.dumps(qa))
        (tmp / "shapes_text.json").write_text(json.dumps(text_only))
        for split, (questions_, answers) in scored.items():
            for name, rows in (("questions", questions_), ("answers", answers)):
                (tmp / split / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        train_sentencepiece(texts, tmp / "tokenizer", vocab_size)
        if tfds:
            from mqt_jax.data.shapes_tfds import prepare

            prepare(tmp, tmp / "tfds")
    try:  # a full disk, an error or Ctrl-C: nothing half-written is left
        _fill()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
