"""ScienceQA-IMG: multiple choice, answered with the option's letter."""

from __future__ import annotations

import re

import numpy as np

from mqt_jax.evaluation.benchmarks.base import (
    LETTERS,
    Benchmark,
    Question,
    letter_of,
    options_prompt,
    percent,
    read_records,
    register,
)


@register
class ScienceQA(Benchmark):
    """ScienceQA-IMG: questions as LLaVA's llava_test_CQM-A.json (conversations) or JSON Lines
    {question_id, image, question, choices[, hint]}; references: problems.json ({pid:
    {"answer": index}}) or {question_id, answer: letter}. Questions without an image are
    left out (the IMG subset)."""

    name = "scienceqa"

    def questions(self, path):
        out = []
        for row in read_records(path):
            qid = str(row.get("question_id", row.get("id")))
            if not row.get("image"):
                continue
            if "conversations" in row:  # LLaVA's converted file: the prompt is ready
                text = row["conversations"][0]["value"].replace("<image>", "").strip()
                options = len(re.findall(r"^[A-Z]\. ", text, re.M))  # "A. ..." lines
                out.append(Question(qid, text, row["image"], {"num_options": options}))
            else:
                text = options_prompt(row["question"], row["choices"], row.get("hint", ""))
                out.append(Question(qid, text, row["image"], {"num_options": len(row["choices"])}))
        return out

    @staticmethod
    def answer_letter(ref: dict) -> str:
        answer = ref["answer"]
        return LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()

    def score(self, predictions, questions, refs):
        ok = [letter_of(predictions[q.question_id], q.meta["num_options"])
              == self.answer_letter(refs[q.question_id]) for q in questions]
        return {"score": percent(np.mean(ok))}
