"""The papers' benchmarks: question files in the formats of LLaVA's evaluation scripts, their
official scoring, and answers in the upstream submission formats.

A benchmark reads its questions (`questions(path)` -> Question list; the prompt text is what
the model sees, with the benchmark's answer instruction), reads references (`--answers`, in
the dataset's own annotation format or JSON Lines `{"question_id", "answer" | "answers" |
"label"}`), scores predictions (`score` -> {"score": headline %, ...details}) and writes the
files to submit (`submission` -> {file name: text}).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from pathlib import Path

import numpy as np

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


@dataclasses.dataclass
class Question:
    question_id: str
    text: str  # the prompt the model sees, instruction included
    image: object  # a path relative to the image folder, or a PIL image (MMBench's TSV)
    meta: dict = dataclasses.field(default_factory=dict)  # category, options, round, ...


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
    return rows


def read_records(path: str | Path) -> list[dict]:
    """JSON Lines, or JSON: a list, {"annotations": [...]} (VQA), {"data": [...]} (TextVQA), or
    {id: record} (GQA, ScienceQA), the id becoming the record's question_id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if isinstance(data, dict):
        for key in ("annotations", "data", "questions"):
            if isinstance(data.get(key), list):
                return data[key]
        return [{"question_id": k, **v} for k, v in data.items() if isinstance(v, dict)]
    return data


def llava_questions(path) -> list[Question]:
    """LLaVA's question files: JSON Lines {"question_id", "image", "text"[, "category"]}."""
    out = []
    for row in read_records(path):
        missing = {"question_id", "text"} - set(row)
        if missing:
            raise ValueError(f"{path}: a question lacks {sorted(missing)}: {str(row)[:120]}")
        meta = {k: v for k, v in row.items() if k not in ("question_id", "text", "image")}
        out.append(Question(str(row["question_id"]), row["text"], row.get("image"), meta))
    return out


def by_id(records: list[dict], path, key: str = "question_id") -> dict[str, dict]:
    out = {}
    for r in records:
        if key not in r:
            raise ValueError(f"{path}: a reference lacks {key!r}: {str(r)[:120]}")
        out[str(r[key])] = r
    return out


def check_covered(questions: list[Question], refs: dict, path, key=lambda q: q.question_id):
    missing = [q.question_id for q in questions if key(q) not in refs]
    if missing:
        raise ValueError(f"{path}: no reference answer for {len(missing)} questions "
                         f"(first: {missing[0]!r})")


def percent(x: float) -> float:
    return 100.0 * float(x)


def stderr(outcomes: list[bool]) -> float:
    """The standard error (in points) of an accuracy over these right / wrong outcomes."""
    p, n = float(np.mean(outcomes)), len(outcomes)
    return percent(np.sqrt(p * (1 - p) / n))


class Benchmark:
    """LLaVA-format questions, exact-match scoring, LLaVA answer files as the submission."""

    name = ""
    needs_references = True

    def questions(self, path) -> list[Question]:
        return llava_questions(path)

    def references(self, path, questions: list[Question]) -> dict:
        refs = by_id(read_records(path), path)
        check_covered(questions, refs, path)
        return refs

    def score(self, predictions: dict[str, str], questions, refs) -> dict:
        raise NotImplementedError

    def correct(self, predictions: dict[str, str], questions, refs) -> dict[str, bool]:
        """Each answer right or wrong (what choosing m per query is scored on); only the
        benchmarks scored by a per-question exact match define it."""
        raise ValueError(f"benchmark {self.name} does not score answers one by one as right or "
                         f"wrong: choosing m per query is evaluated on one that does (shapes)")

    def majority_baseline(self, questions, refs) -> dict[str, float] | None:
        """The score of answering every question with its type's most frequent answer, where
        the benchmark defines one (shapes-VQA), else None."""
        return None

    def submission(self, predictions: dict[str, str], questions, refs, m: int) -> dict[str, str]:
        """Files beyond answers_m<m>.jsonl (LLaVA's answer file, always written)."""
        return {}


def llava_answers(predictions: dict[str, str], questions: list[Question], m: int,
                  model_id: str = "mqt-jax") -> str:
    """LLaVA's answer file (model_vqa.py): one JSON object per question."""
    rows = [{"question_id": q.question_id, "prompt": q.text, "text": predictions[q.question_id],
             "answer_id": f"{q.question_id}-m{m}", "model_id": model_id, "metadata": {"m": m}}
            for q in questions]
    return "".join(json.dumps(r) + "\n" for r in rows)


def int_or_str(x: str):
    return int(x) if x.isdigit() else x


# ------------------------------------------------------------------- multiple choice
def options_prompt(question: str, options: list[str], hint: str = "") -> str:
    """LLaVA's multiple-choice prompt (ScienceQA, MMBench, MMMU)."""
    text = f"{hint}\n{question}" if hint else question
    text += "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{text}\n{LETTER_ANSWER}"


def letter_of(prediction: str, num_options: int) -> str | None:
    """LLaVA's ScienceQA parsing: the bare letter, "X. ...", or "The answer is X."."""
    letters = LETTERS[:num_options]
    text = prediction.strip()
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 and found[0] in letters else None


def shapes_normalize(text: str) -> str:
    """Lower case, outer whitespace and a final period removed, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def yes_label(ref: dict) -> bool:
    label = str(ref.get("label", ref.get("answer", ""))).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"a POPE/MME reference must be yes or no: {str(ref)[:120]}")
    return label == "yes"


BENCHMARKS: dict[str, Benchmark] = {}  # filled by @register in each benchmark's file


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: the benchmark `EvalConfig.benchmark = cls.name` evaluates."""
    if cls.name in BENCHMARKS:
        raise ValueError(f"benchmark {cls.name!r} is registered twice")
    BENCHMARKS[cls.name] = cls()
    return cls


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
