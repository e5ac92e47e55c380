"""MMMU (validation): multiple choice or open answers, parsed as MMMU's own evaluation does."""

from __future__ import annotations

import json
import random
import zlib

import numpy as np

from mqt_jax.evaluation.benchmarks.base import (
    LETTERS,
    SHORT_ANSWER,
    Benchmark,
    Question,
    options_prompt,
    percent,
    read_records,
    register,
    shapes_normalize,
)


def mmmu_choice(response: str, options: list[str], seed_text: str) -> str:
    """MMMU's parse_multi_choice_response: "(X)", then "X" as a word, then an option's text
    (in a response of more than five words); several candidates -> the last mentioned; none
    -> a random letter (seeded by the question id, so scores are reproducible)."""
    letters = list(LETTERS[:len(options)])
    text = " " + response.strip().strip(",.!?;:'") + " "
    candidates = [c for c in letters if f"({c})" in text]
    if not candidates:
        candidates = [c for c in letters if f" {c} " in text]
    by_content = False
    if not candidates and len(text.split()) > 5:
        candidates = [c for c, o in zip(letters, options) if o.lower() in text.lower()]
        by_content = bool(candidates)
    if not candidates:
        return random.Random(zlib.crc32(seed_text.encode())).choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        return max(candidates, key=lambda c: text.lower().rfind(options[letters.index(c)].lower()))
    return max(candidates, key=lambda c: max(text.rfind(f"({c})"), text.rfind(f" {c} ")))


@register
class MMMU(Benchmark):
    """JSON Lines {question_id, image, question, options (list), question_type}; multiple-
    choice answers parsed as MMMU does; open questions: normalised exact match."""

    name = "mmmu"

    def questions(self, path):
        out = []
        for row in read_records(path):
            options = row.get("options") or []
            if isinstance(options, str):
                options = json.loads(options.replace("'", '"'))
            mc = row.get("question_type", "multiple-choice") == "multiple-choice"
            text = options_prompt(row["question"], options) if mc else f"{row['question']}\n{SHORT_ANSWER}"
            out.append(Question(str(row["question_id"]), text, row.get("image"),
                                {"options": options, "multiple_choice": mc}))
        return out

    def parsed(self, q: Question, prediction: str) -> str:
        if q.meta["multiple_choice"]:
            return mmmu_choice(prediction, q.meta["options"], q.question_id)
        return shapes_normalize(prediction)

    def score(self, predictions, questions, refs):
        ok = []
        for q in questions:
            want = refs[q.question_id]["answer"]
            want = want.strip().upper() if q.meta["multiple_choice"] else shapes_normalize(want)
            ok.append(self.parsed(q, predictions[q.question_id]) == want)
        return {"score": percent(np.mean(ok))}

    def submission(self, predictions, questions, refs, m):
        return {"mmmu_predictions.json": json.dumps(
            {q.question_id: self.parsed(q, predictions[q.question_id]) for q in questions})}
