"""POPE: yes / no object hallucination, accuracy / precision / recall / F1 per split."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from mqt_jax.evaluation.benchmarks.base import Benchmark, percent, register, yes_label


# ------------------------------------------------------------------------ POPE and MME
def pope_yes(prediction: str) -> bool:
    """LLaVA's POPE parsing: the first sentence; "no" / "not" as a word means no."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return not any(w in ("No", "not", "no") for w in words)


def binary_metrics(pred_yes: list[bool], gold_yes: list[bool]) -> dict[str, float]:
    p, g = np.array(pred_yes), np.array(gold_yes)
    tp, fp, tn, fn = (p & g).sum(), (p & ~g).sum(), (~p & ~g).sum(), (~p & g).sum()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent((tp + tn) / len(p)), "precision": percent(precision),
            "recall": percent(recall), "f1": percent(f1), "yes_ratio": percent(p.mean())}


@register
class POPE(Benchmark):
    """Per split (the question's `category`: adversarial, popular, random); the headline is
    the mean F1 over splits, as LLaVA reports it."""

    name = "pope"

    def score(self, predictions, questions, refs):
        splits = defaultdict(list)
        for q in questions:
            splits[q.meta.get("category", "all")].append(q)
        out = {s: binary_metrics([pope_yes(predictions[q.question_id]) for q in qs],
                                 [yes_label(refs[q.question_id]) for q in qs])
               for s, qs in sorted(splits.items())}
        return {"score": float(np.mean([v["f1"] for v in out.values()])), **out}
