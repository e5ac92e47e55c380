"""MME: yes / no pairs, accuracy and accuracy+ per subtask, perception and cognition sums."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mqt_jax.evaluation.benchmarks.base import Benchmark, percent, register, yes_label

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")


MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_answer(prediction: str) -> str:
    """MME's parsing: "yes" / "no", else whichever of them the first four characters hold."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@register
class MME(Benchmark):
    """Per subtask (`category`): accuracy and accuracy+ (both questions of an image right),
    in %; a subtask's score is their sum; perception and cognition totals add subtasks."""

    name = "mme"

    def score(self, predictions, questions, refs):
        tasks = defaultdict(lambda: defaultdict(list))
        for q in questions:
            ok = mme_answer(predictions[q.question_id]) == ("yes" if yes_label(refs[q.question_id]) else "no")
            tasks[q.meta.get("category", "all")][str(q.image)].append(ok)
        out = {}
        for task, images in sorted(tasks.items()):
            answers = [ok for oks in images.values() for ok in oks]
            acc, acc_plus = percent(np.mean(answers)), percent(np.mean([all(v) for v in images.values()]))
            out[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus}
        perception = sum(v["score"] for t, v in out.items() if t in MME_PERCEPTION)
        cognition = sum(v["score"] for t, v in out.items() if t in MME_COGNITION)
        return {"score": perception, "perception": perception, "cognition": cognition, **out}

    def submission(self, predictions, questions, refs, m):
        """MME's eval_tool input: one file per subtask, lines image \\t question \\t gt \\t pred."""
        files = defaultdict(str)
        for q in questions:
            gold = "Yes" if yes_label(refs[q.question_id]) else "No"
            line = "\t".join([Path(str(q.image)).name, q.text.replace("\n", " "), gold,
                              predictions[q.question_id].replace("\n", " ")])
            files[f"mme/{q.meta.get('category', 'all')}.txt"] += line + "\n"
        return dict(files)
