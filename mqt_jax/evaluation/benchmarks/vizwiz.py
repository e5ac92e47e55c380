"""VizWiz: VQA accuracy, unanswerable questions included; the submission is the challenge's JSON."""

from __future__ import annotations

import json
from pathlib import Path

from mqt_jax.evaluation.benchmarks.base import (
    Question,
    by_id,
    check_covered,
    read_records,
    register,
)
from mqt_jax.evaluation.benchmarks.vqav2 import VQAv2, vqa_normalize


@register
class VizWiz(VQAv2):
    """Annotations are keyed by image file name; "unanswerable" is an answer like any other
    (the prompt asks for it when the image does not show enough)."""

    name = "vizwiz"

    def references(self, path, questions):
        records = read_records(path)
        key = "question_id" if records and "question_id" in records[0] else "image"
        refs = by_id(records, path, key)
        check_covered(questions, refs, path, key=lambda q: self._key(q, key))
        return {q.question_id: refs[self._key(q, key)] for q in questions}

    @staticmethod
    def _key(q: Question, key: str) -> str:
        return q.question_id if key == "question_id" else Path(str(q.image)).name

    def submission(self, predictions, questions, refs, m):
        rows = [{"image": Path(str(q.image)).name, "answer": vqa_normalize(predictions[q.question_id])}
                for q in questions]
        return {"vizwiz_answers_upload.json": json.dumps(rows)}
