"""GQA (testdev balanced): exact match after GQA's normalisation."""

from __future__ import annotations

import json

import numpy as np

from mqt_jax.evaluation.benchmarks.base import Benchmark, percent, register


# --------------------------------------------------------------------- GQA and shapes-VQA
def gqa_normalize(answer: str) -> str:
    return answer.strip().rstrip(".").lower()


@register
class GQA(Benchmark):
    name = "gqa"

    def score(self, predictions, questions, refs):
        ok = [gqa_normalize(predictions[q.question_id]) == gqa_normalize(refs[q.question_id]["answer"])
              for q in questions]
        return {"score": percent(np.mean(ok))}

    def submission(self, predictions, questions, refs, m):
        rows = [{"questionId": q.question_id, "prediction": gqa_normalize(predictions[q.question_id])}
                for q in questions]
        return {"testdev_balanced_predictions.json": json.dumps(rows)}
