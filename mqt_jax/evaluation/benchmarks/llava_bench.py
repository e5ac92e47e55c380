"""LLaVA-Bench (in the wild): open answers, written for GPT-4 review (no score here)."""

from __future__ import annotations

from mqt_jax.evaluation.benchmarks.base import Benchmark, register


# ------------------------------------------------------------- judged by a model: no score
@register
class LLaVABench(Benchmark):
    """Scored by a judge model upstream: only LLaVA's answer file is written."""

    name = "llava_bench"
    needs_references = False

    def references(self, path, questions):
        return {}

    def score(self, predictions, questions, refs):
        return {}
