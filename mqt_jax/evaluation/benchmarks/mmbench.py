"""MMBench (dev): multiple choice with circular evaluation over rotated options."""

from __future__ import annotations

import base64
import csv
import io
import re
from collections import defaultdict

import numpy as np

from mqt_jax.evaluation.benchmarks.base import (
    LETTERS,
    Benchmark,
    Question,
    options_prompt,
    percent,
    register,
)


# ------------------------------------------------------------------------------ MMBench
def mmbench_letter(prediction: str, options: list[str]) -> str | None:
    """MMBench's can_infer: exactly one option letter as a word (punctuation aside), else
    exactly one option's text in the answer; otherwise nothing."""
    letters = LETTERS[:len(options)]
    words = re.sub(r"[.,:;!?()\[\]'\"]", " ", prediction).split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    found = [c for c, o in zip(letters, options) if o.lower() in prediction.lower()]
    return found[0] if len(found) == 1 else None


@register
class MMBench(Benchmark):
    """MMBench's TSV (index, question, hint, A.., answer, category, image as base64). Circular
    evaluation: each question is asked once per rotation of its options and counts as right
    only when every rotation is answered right. The references are the TSV's own answers."""

    name = "mmbench"
    needs_references = False

    def questions(self, path):
        import binascii

        from mqt_jax.data.preprocess import open_image

        csv.field_size_limit(1 << 30)
        out = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                options = [row[c] for c in LETTERS[:8] if row.get(c) not in (None, "", "nan")]
                try:
                    image = open_image(base64.b64decode(row.get("image") or "", validate=True))
                except (binascii.Error, ValueError) as e:
                    raise ValueError(f"{path}: question {row.get('index')}: {e}") from None
                hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else ""
                answer = LETTERS.index(row["answer"].strip()) if row.get("answer") else None
                for r in range(len(options)):  # round r shifts the options by r
                    rotated = options[r:] + options[:r]
                    meta = {"index": row["index"], "round": r, "options": rotated,
                            "question": row["question"], "hint": hint,
                            "category": row.get("category", ""),
                            "answer": None if answer is None else LETTERS[(answer - r) % len(options)]}
                    out.append(Question(f"{row['index']}_r{r}", options_prompt(row["question"], rotated, hint),
                                        image, meta))
        return out

    def references(self, path, questions):
        return {q.question_id: q.meta for q in questions}

    def score(self, predictions, questions, refs):
        rounds = defaultdict(list)
        for q in questions:
            rounds[q.meta["index"]].append(
                mmbench_letter(predictions[q.question_id], q.meta["options"]) == q.meta["answer"])
        circular = {i: all(v) for i, v in rounds.items()}
        category = {q.meta["index"]: q.meta["category"] for q in questions}
        groups = defaultdict(list)
        for i, ok in circular.items():
            groups[category[i]].append(ok)
        return {"score": percent(np.mean(list(circular.values()))),
                "single_round": percent(np.mean([v[0] for v in rounds.values()])),
                **{f"category/{c}": percent(np.mean(v)) for c, v in sorted(groups.items())}}

    def submission(self, predictions, questions, refs, m):
        """Rows as the TSV's with the options rotated and a prediction column; a rotation's
        index is index + round * 1e6 (MMBench's convention for circular copies)."""
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "prediction",
                         "category"])
        for q in questions:
            options = (q.meta["options"] + [""] * 4)[:4]
            writer.writerow([int(q.meta["index"]) + q.meta["round"] * 1_000_000, q.meta["question"],
                             q.meta["hint"], *options,
                             q.meta["answer"], predictions[q.question_id], q.meta["category"]])
        return {"mmbench_predictions.tsv": buf.getvalue()}
