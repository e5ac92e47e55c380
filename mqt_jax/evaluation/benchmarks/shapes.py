"""shapes-VQA, the embedded default data (mqt_jax/data/shapes.py): exact match, by question type, with standard errors."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from mqt_jax.evaluation.benchmarks.base import (
    Benchmark,
    percent,
    register,
    shapes_normalize,
    stderr,
)


@register
class Shapes(Benchmark):
    """shapes-VQA's held-out split: exact match, per category, next to the majority-answer
    baseline (the most frequent answer of each question type, from the answers themselves:
    what an answer prior alone achieves)."""

    name = "shapes"

    def score(self, predictions, questions, refs):
        """{"score", each category's accuracy, "stderr": {the same keys}, "by_type": {question
        type: accuracy}, "by_type_stderr": {...}}: exact-match %, standard errors in points."""
        ok = self.correct(predictions, questions, refs)
        overall = {"score": list(ok.values()), **dict(sorted(self.groups(ok, refs, "category").items()))}
        by_type = self.groups(ok, refs, "type")
        return {**{k: percent(np.mean(v)) for k, v in overall.items()},
                "stderr": {k: stderr(v) for k, v in overall.items()},
                **({"by_type": {k: percent(np.mean(v)) for k, v in by_type.items()},
                    "by_type_stderr": {k: stderr(v) for k, v in by_type.items()}} if by_type else {})}

    def correct(self, predictions, questions, refs):
        return {q.question_id: shapes_normalize(predictions.get(q.question_id, ""))
                == shapes_normalize(refs[q.question_id]["answer"]) for q in questions}

    @staticmethod
    def groups(ok: dict[str, bool], refs, field: str) -> dict[str, list[bool]]:
        """The questions' results grouped by their reference's `field` (first-seen order)."""
        groups = defaultdict(list)
        for qid, good in ok.items():
            if field in refs[qid]:
                groups[refs[qid][field]].append(good)
        return dict(groups)

    def majority_baseline(self, questions, refs) -> dict[str, float]:
        kind = lambda r: r.get("type", r.get("category", "all"))  # noqa: E731
        top = {}
        for t in {kind(r) for r in refs.values()}:
            counts = Counter(shapes_normalize(r["answer"]) for r in refs.values() if kind(r) == t)
            top[t] = counts.most_common(1)[0][0]
        return self.score({q.question_id: top[kind(refs[q.question_id])] for q in questions},
                          questions, refs)
