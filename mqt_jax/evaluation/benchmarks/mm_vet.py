"""MM-Vet: open answers, written as the evaluation server's JSON (no score here)."""

from __future__ import annotations

import json

from mqt_jax.evaluation.benchmarks.base import register
from mqt_jax.evaluation.benchmarks.llava_bench import LLaVABench


@register
class MMVet(LLaVABench):
    name = "mmvet"

    def submission(self, predictions, questions, refs, m):
        return {"mmvet_results.json": json.dumps({q.question_id: predictions[q.question_id]
                                                  for q in questions}, indent=1)}
