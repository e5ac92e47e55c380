"""Exact-match VQA evaluation at several m: greedy answers to a LLaVA question file (JSON
Lines: question_id, image, text[, category]) scored against an answer file (question_id,
answer[, category, type]), per m and per category, next to the majority-answer baseline.

Every m runs through the same parameters; the prompt at m holds m visual tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import gin
import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mqt_jax.config import ModelConfig
from mqt_jax.data.conversation import encode_prompt
from mqt_jax.data.preprocess import clip_preprocess
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.generate import cut_at_eos, greedy, prompt_batch
from mqt_jax.models.vlm import VisionLanguageModel
from mqt_jax.splice import check_m, true_length
from mqt_jax.train import write_atomic


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    questions: str = ""  # JSON Lines question file; empty: no evaluation
    answers: str = ""
    image_root: str = ""
    tokenizer_dir: str = ""
    template: str = "vicuna_v1"
    image_mode: str = "pad"
    m_values: tuple[int, ...] = (1, 2, 4, 8, 16, 36, 64)  # capped at M; M itself is added
    batch_size: int = 64
    max_new_tokens: int = 8
    bucket: int = 16  # prompt lengths round up to a multiple of this (one compile per bucket)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
    return rows


def normalize(text: str) -> str:
    """Lower case, outer whitespace and a final period removed, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def m_values_for(config: EvalConfig, num_queries: int) -> list[int]:
    values = sorted({m for m in config.m_values if m <= num_queries} | {num_queries})
    check_m(values, num_queries)
    return values


def majority_baseline(answers: list[dict]) -> dict[str, float]:
    """Accuracy of always giving the most frequent answer of each question type (the
    answers' `type`, else their `category`): what an answer prior alone achieves. Taken from
    the evaluated answers themselves, so it is an upper bound for any blind guesser."""
    kind = lambda a: a.get("type", a.get("category", "all"))  # noqa: E731
    top = {t: Counter(normalize(a["answer"]) for a in answers if kind(a) == t).most_common(1)[0][0]
           for t in {kind(a) for a in answers}}
    return accuracy({a["question_id"]: top[kind(a)] for a in answers}, answers)


def accuracy(predictions: dict[str, str], answers: list[dict]) -> dict[str, float]:
    correct, total = Counter(), Counter()
    for a in answers:
        ok = normalize(predictions.get(a["question_id"], "")) == normalize(a["answer"])
        for group in {"all", a.get("category", "all")}:
            total[group] += 1
            correct[group] += ok
    return {g: correct[g] / total[g] for g in total}


class Answerer:
    """Greedy answers to a question file at any m, images and prompts prepared once."""

    def __init__(self, model_config: ModelConfig, params, config: EvalConfig, questions):
        self.model_config, self.params, self.config = model_config, params, config
        self.model = VisionLanguageModel(model_config)
        self.tokenizer = load_tokenizer(config.tokenizer_dir)
        self.questions = questions
        self.prompts = [encode_prompt(q["text"], config.template, self.tokenizer) for q in questions]
        size, root = model_config.vision.image_size, Path(config.image_root)
        images = {}
        for q in questions:
            if q["image"] not in images:
                path = root / q["image"]
                if not path.is_file():
                    raise FileNotFoundError(f"question {q['question_id']}: image {path} not found")
                images[q["image"]] = clip_preprocess(Image.open(path), size, config.image_mode)
        self.images = np.stack([images[q["image"]] for q in questions])

    def answer(self, m: int) -> dict[str, str]:
        cfg, n = self.config, len(self.questions)
        longest = max(true_length(p, [m]) for p in self.prompts)
        seq_len = -(-longest // cfg.bucket) * cfg.bucket
        out = {}
        for start in range(0, n, cfg.batch_size):
            idx = np.arange(start, start + cfg.batch_size) % n  # the last batch wraps around
            batch = prompt_batch([self.prompts[i] for i in idx], self.images[idx], m,
                                 self.model_config.num_queries, seq_len)
            ids = greedy(self.model, self.params, batch, self.tokenizer.eos_id,
                         max_new_tokens=cfg.max_new_tokens)
            for i, tokens in zip(idx, cut_at_eos(jax.device_get(ids), self.tokenizer.eos_id)):
                out[self.questions[i]["question_id"]] = self.tokenizer.decode(tokens)
        return out


def evaluate(model_config: ModelConfig, params, config: EvalConfig, out_dir: str | Path | None = None):
    """Accuracy per m (and category) on config.questions; writes answers_m<m>.jsonl,
    eval.json and eval.md into out_dir. Returns the eval.json dict."""
    questions, answers = read_jsonl(config.questions), read_jsonl(config.answers)
    known = {q["question_id"] for q in questions}
    unanswered = [a["question_id"] for a in answers if a["question_id"] not in known]
    if unanswered:
        raise ValueError(f"{config.answers}: {len(unanswered)} answers have no question in "
                         f"{config.questions} (first: {unanswered[0]!r})")
    m_values = m_values_for(config, model_config.num_queries)
    answerer = Answerer(model_config, params, config, questions)
    results = {"majority_baseline": majority_baseline(answers), "accuracy": {}}
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for m in tqdm(m_values, desc="eval", unit="m"):
        predictions = answerer.answer(m)
        results["accuracy"][m] = accuracy(predictions, answers)
        if out_dir:
            write_lines(out_dir / f"answers_m{m}.jsonl", [
                {"question_id": k, "text": v, "m": m} for k, v in predictions.items()])
    if out_dir:
        write_atomic(out_dir / "eval.json", json.dumps(results, indent=1))
        write_atomic(out_dir / "eval.md", markdown_table(results))
    return results


def write_lines(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def markdown_table(results: dict) -> str:
    groups = sorted({g for acc in results["accuracy"].values() for g in acc},
                    key=lambda g: (g != "all", g))
    lines = ["| m | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for m, acc in results["accuracy"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * acc.get(g, 0):.1f}" for g in groups) + " |")
    base = results["majority_baseline"]
    lines.append("| majority baseline | " + " | ".join(f"{100 * base.get(g, 0):.1f}" for g in groups) + " |")
    return "\n".join(lines) + "\n"
