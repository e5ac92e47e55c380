"""TextVQA: VQA accuracy on questions about text in the image."""

from __future__ import annotations

import json

from mqt_jax.evaluation.benchmarks.base import int_or_str, register
from mqt_jax.evaluation.benchmarks.vqav2 import VQAv2


@register
class TextVQA(VQAv2):
    name = "textvqa"

    def submission(self, predictions, questions, refs, m):
        rows = [{"question_id": int_or_str(q.question_id), "answer": predictions[q.question_id]}
                for q in questions]
        return {"textvqa_answers.json": json.dumps(rows)}
