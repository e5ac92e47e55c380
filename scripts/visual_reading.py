"""Where a shapes-VQA model's accuracy stalls: in the visual tokens, or in the LLM reading them.

    python scripts/visual_reading.py --run workdir/tiny/stage2 [--data data/shapes] [--m 1,4,64]

Prints four tables, on the validation split (never the held-out one):
1. What the visual tokens hold: a ridge probe (closed form, on the first N training images)
   from the first m tokens to each grid cell's colour (or "empty") and each cell's kind of
   shape, scored on the validation images, averaged over the 9 cells. Labels are rebuilt from
   the generator's seed (the scene is the first thing drawn for each image index).
2. What the LLM takes from them: the mean log-probability of each reference answer given the
   true image, and given another image (the questions of image i+1), by question type and m.
   Equal columns mean the answer does not depend on the image.
3. Whether the LLM reads the same facts as text (no image): for the count and per-cell
   questions of the first validation images, the share answered right (the candidate answer of
   highest log-probability) with the image's detailed description in context before the
   question, against the question alone. A pretrained LLM such as Vicuna does this; a model
   that cannot find "row 2, column 3" in a text before it has little chance among visual tokens.

4. Whether the tokens of one image differ at all: over the first m tokens of each validation
   image, their mean pairwise cosine, and the RMS of what sets each token apart from the
   image's mean token against that mean's RMS. An LLM cannot tell near-identical tokens apart
   (the released resampler from a random initialisation gives cosine ~1: the image's mean
   patch, m times).

`--tables 3` alone also takes stage 0's language model (data/shapes/pretrained/llm).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from PIL import Image

import mqt_jax
from mqt_jax.core.outputs import markdown_table
from mqt_jax.data import shapes as shapes_vqa
from mqt_jax.data.conversation import encode_conversation
from mqt_jax.data.shapes import COLOURS, SHAPES, random_scene, scene_index
from mqt_jax.data.tokenizer import load_tokenizer

GRID = 3


def cell_labels(index: int, seed: int) -> np.ndarray:
    """[2, 9]: per cell (row-major) its colour (1 + COLOURS index, 0 empty) and kind (1 +
    SHAPES index, 0 empty), as write_shapes drew image `index`."""
    cells = {(s.row, s.col): s for s in random_scene(np.random.default_rng([seed, index]))}
    colours, kinds = list(COLOURS), list(SHAPES)
    where = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
    return np.array([[colours.index(cells[p].colour) + 1 if p in cells else 0 for p in where],
                     [kinds.index(cells[p].kind) + 1 if p in cells else 0 for p in where]])


def load(folder: Path, names: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / name).convert("RGB")) for name in names]


def tokens(model, images, m: int, chunk: int = 100) -> np.ndarray:
    """The first m visual tokens of each image, flattened: [N, m * hidden]."""
    parts = [np.asarray(model.visual_tokens(images[i:i + chunk], m=m))[:, :m]
             for i in range(0, len(images), chunk)]
    return np.concatenate(parts).reshape(len(images), -1).astype(np.float64)


def ridge_accuracy(x_train, y_train, x_val, y_val, classes: int, ridge: float = 0.1) -> float:
    """One-vs-all ridge regression in its dual form (N x N: the features are wide)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    gram = x_train @ x_train.T
    alpha = np.linalg.solve(gram + ridge * len(gram) * np.eye(len(gram)), np.eye(classes)[y_train])
    return float((np.argmax(x_val @ x_train.T @ alpha, 1) == y_val).mean())


def probe(model, data: Path, m_values, num_train: int, seed: int) -> list[list[str]]:
    train = load(data / "images", [f"train/{i:06d}.png" for i in range(num_train)])
    num_val = len(list((data / "images" / "val").glob("*.png")))
    val = load(data / "images", [f"val/{i:06d}.png" for i in range(num_val)])
    y_train = np.stack([cell_labels(scene_index("train", i), seed) for i in range(num_train)])
    y_val = np.stack([cell_labels(scene_index("val", i), seed) for i in range(num_val)])
    rows = []
    for m in m_values:
        x_train, x_val = tokens(model, train, m), tokens(model, val, m)
        scores = [np.mean([ridge_accuracy(x_train, y_train[:, a, c], x_val, y_val[:, a, c], n)
                           for c in range(GRID * GRID)]) for a, n in ((0, len(COLOURS) + 1),
                                                                      (1, len(SHAPES) + 1))]
        rows.append([str(m)] + [f"{100 * s:.1f}" for s in scores])
    majority = [np.mean([np.bincount(y_val[:, a, c]).max() / len(y_val) for c in range(GRID * GRID)])
                for a in (0, 1)]
    return rows + [["majority"] + [f"{100 * s:.1f}" for s in majority]]


def distinctness(tokens: np.ndarray) -> tuple[float, float, float]:
    """tokens [N, m, D] -> (mean cosine between two tokens of one image, RMS of the tokens
    minus their image's mean token, RMS of that mean)."""
    tokens = np.asarray(tokens, np.float64)
    common = tokens.mean(1, keepdims=True)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    cosine = np.einsum("nid,njd->nij", unit, unit)
    m = tokens.shape[1]
    mean_cosine = float(cosine[:, ~np.eye(m, dtype=bool)].mean()) if m > 1 else float("nan")
    rms = lambda x: float(np.sqrt((x ** 2).mean()))  # noqa: E731
    return mean_cosine, rms(tokens - common), rms(common)


def token_spread(model, data: Path, m_values, limit: int = 200) -> list[list[str]]:
    names = sorted(p.name for p in (data / "images" / "val").glob("*.png"))[:limit]
    images = load(data / "images" / "val", names)
    every = np.asarray(model.visual_tokens(images))
    rows = []
    for m in m_values:
        cosine, apart, common = distinctness(every[:, :m])
        rows.append([str(m), "-" if m == 1 else f"{cosine:.3f}", f"{apart:.3f}", f"{common:.3f}"])
    return rows


def image_use(model, data: Path, m_values, limit: int) -> list[list[str]]:
    read = lambda name: [json.loads(line) for line in (data / "val" / name).open()][:limit]  # noqa: E731
    questions, answers = read("questions.jsonl"), read("answers.jsonl")
    images = load(data / "images", [q["image"] for q in questions])
    per_image = sum(q["image"] == questions[0]["image"] for q in questions)
    other = np.roll(np.arange(len(images)), per_image)  # the next image's questions' image
    texts, refs = [q["text"] for q in questions], [a["answer"] for a in answers]
    by_type = collections.defaultdict(dict)
    for m in m_values:
        true = model.score(images, texts, refs, m=m)
        swapped = model.score([images[i] for i in other], texts, refs, m=m)
        for kind in dict.fromkeys(a["type"] for a in answers):
            pick = np.array([a["type"] == kind for a in answers])
            by_type[kind][m] = f"{true[pick].mean():.2f} / {swapped[pick].mean():.2f}"
    return [[kind] + [cells[m] for m in m_values] for kind, cells in by_type.items()]


CANDIDATES = {"count": [str(n) for n in range(1, GRID * GRID + 1)], "colour_at": list(COLOURS),
              "shape_at": list(SHAPES)}


def val_questions(number: int, seed: int) -> tuple[list, list[tuple[str, str, str]]]:
    """Validation image `number`'s shapes and its (type, question, answer) triples, drawn from
    the seed as write_shapes drew them (the scene first, then its questions)."""
    rng = np.random.default_rng([seed, scene_index("val", number)])
    shapes = random_scene(rng)
    return shapes, [(kind, q, a) for kind, (q, a, _) in zip(shapes_vqa.QUESTION_TYPES,
                                                           shapes_vqa.questions(shapes, rng))]


def text_turns(shapes, question: str, answer: str, described: bool,
               layout: str = "turn") -> list[dict]:
    """A text-only conversation: when `described`, the description as its own turn (layout
    "turn", as the stage-0 corpus has it) or inside the question's ("question": "The picture:
    <description>\n<question>"), then the question."""
    if layout not in ("turn", "question"):
        raise ValueError(f"layout {layout!r}: 'turn' or 'question'")
    text = f"{question}\n{shapes_vqa.SHORT_ANSWER}"
    before = []
    if described and layout == "turn":
        before = [{"from": "human", "value": shapes_vqa.DESCRIBE_PROMPT},
                  {"from": "gpt", "value": shapes_vqa.caption(shapes)}]
    elif described:
        text = f"The picture: {shapes_vqa.caption(shapes)}\n{text}"
    return before + [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]


def text_reading(model, tokenizer, limit: int, seed: int, layout: str = "turn") -> list[list[str]]:
    """Table 3: the run's LLM alone, each candidate answer scored by its log-probability."""
    import jax
    import jax.numpy as jnp

    from mqt_jax.models.llama import Llama

    llm, params = Llama(model.config.llm), model.params["llm"]

    @jax.jit
    def log_probs(ids):
        x = llm.apply({"params": params}, ids, method=Llama.embed)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return jax.nn.log_softmax(llm.apply({"params": params}, x, positions, jnp.ones_like(ids)))

    right = collections.defaultdict(list)  # (question type, described) -> [bool]
    for number in range(limit):
        shapes, asked = val_questions(number, seed)
        for kind, question, answer in asked:
            if kind not in CANDIDATES:
                continue
            for described in (True, False):
                examples = [encode_conversation(text_turns(shapes, question, c, described, layout),
                                                "vicuna_v1", tokenizer, has_image=False)
                            for c in CANDIDATES[kind]]
                width = -(-max(len(e.tokens) for e in examples) // 64) * 64  # few compiled shapes
                ids, spans = np.zeros((len(examples), width), np.int32), []
                for row, example in enumerate(examples):
                    ids[row, :len(example.tokens)] = example.tokens
                    prompt_end = max(j for j, label in enumerate(example.labels) if label < 0)
                    spans.append([(j, example.labels[j])
                                  for j in range(prompt_end + 1, len(example.labels))])
                lp = np.asarray(log_probs(jnp.asarray(ids)))
                scores = [sum(lp[row, j - 1, t] for j, t in span) for row, span in enumerate(spans)]
                right[kind, described].append(CANDIDATES[kind][int(np.argmax(scores))] == answer)
    return [[kind, f"{100 * np.mean(right[kind, True]):.1f}", f"{100 * np.mean(right[kind, False]):.1f}",
             f"{100 / len(CANDIDATES[kind]):.1f}"] for kind in CANDIDATES]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run (e.g. workdir/tiny/stage2)")
    parser.add_argument("--step", type=int, default=None, help="the run's checkpoint (default: latest)")
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--m", default="1,4,64")
    parser.add_argument("--num_train", type=int, default=1500, help="probe training images")
    parser.add_argument("--limit", type=int, default=500, help="validation questions scored")
    parser.add_argument("--seed", type=int, default=0, help="write_shapes' seed")
    parser.add_argument("--tables", default="1,2,3,4", help="which tables to print")
    parser.add_argument("--description", choices=("turn", "question"), default="turn",
                        help="table 3: the description as its own turn, or inside the question's")
    parser.add_argument("--text_images", type=int, default=150,
                        help="validation images whose questions table 3 asks as text")
    args = parser.parse_args()
    data, m_values = Path(args.data), [int(m) for m in args.m.split(",")]
    if not (data / "val" / "questions.jsonl").is_file():
        parser.error(f"{data} has no validation split (val/questions.jsonl)")
    tables = {int(t) for t in args.tables.split(",")}
    model = mqt_jax.load(args.run, step=args.step)
    if 1 in tables:
        print(f"1. ridge probe on the first m visual tokens ({args.num_train} training images, "
              f"validation accuracy %, mean of the 9 cells)\n")
        print(markdown_table(["m", "cell colour (or empty)", "cell kind (or empty)"],
                             probe(model, data, m_values, args.num_train, args.seed)) + "\n")
    if 2 in tables:
        print(f"2. mean log p(reference answer): true image / another image ({args.limit} "
              f"validation questions)\n")
        print(markdown_table(["type"] + [f"m = {m}" for m in m_values],
                             image_use(model, data, m_values, args.limit)) + "\n")
    if 3 in tables:
        print(f"3. the LLM reading the facts as text: % right, the questions of "
              f"{args.text_images} validation images\n")
        print(markdown_table(["type", "description before the question", "question alone",
                              "one candidate at random"],
                             text_reading(model, model.tokenizer or load_tokenizer(data / "tokenizer"),
                                          args.text_images, args.seed, args.description)) + "\n")
    if 4 in tables:
        print("4. how far the first m tokens of one image differ (validation images)\n")
        print(markdown_table(["m", "mean cosine between two tokens", "RMS apart from the image's mean token",
                              "RMS of that mean"], token_spread(model, data, m_values)) + "\n")


if __name__ == "__main__":
    main()
