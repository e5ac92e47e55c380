"""The papers' benchmarks: question files in the formats of LLaVA's evaluation scripts, their
official scoring, and answers in the upstream submission formats.

A benchmark reads its questions (`questions(path)` -> Question list; the prompt text is what
the model sees, with the benchmark's answer instruction), reads references (`--answers`, in
the dataset's own annotation format or JSON Lines `{"question_id", "answer" | "answers" |
"label"}`), scores predictions (`score` -> {"score": headline %, ...details}) and writes the
files to submit (`submission` -> {file name: text}).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import random
import re
import string
import zlib
from collections import Counter, defaultdict
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
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
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
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
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


# ---------------------------------------------------------------- VQAv2 / VizWiz / TextVQA
# The EvalAI answer normalisation of the VQA evaluation (data tables from its vqaEval.py).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                        "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not between digits
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # a thousands separator


def vqa_normalize(answer: str) -> str:
    """EvalAI's answer processing: lower case, punctuation (dropped next to a space or in
    a text with digit-separating commas, else a space), periods not in numbers, number words
    to digits, articles dropped, contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in PUNCTUATION:
        near_space = p + " " in text or " " + p in text
        spaced = spaced.replace(p, "" if near_space or COMMA_STRIP.search(text) else " ")
    text = PERIOD_STRIP.sub("", spaced, re.UNICODE)  # (count=re.UNICODE, as upstream)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(prediction: str, human_answers: list[str]) -> float:
    """min(#humans who gave the answer / 3, 1), averaged over the 10 subsets of 9 humans."""
    pred = vqa_normalize(prediction)
    answers = [vqa_normalize(a) for a in human_answers]
    matches = sum(a == pred for a in answers)
    subsets = [min((matches - (a == pred)) / 3, 1.0) for a in answers]
    return float(np.mean(subsets)) if subsets else 0.0


def human_answers(record: dict) -> list[str]:
    answers = record.get("answers")
    if answers is None:
        raise ValueError(f"a reference lacks 'answers': {str(record)[:120]}")
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


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


class VQAv2(Benchmark):
    name = "vqav2"

    def score(self, predictions, questions, refs):
        scores = [vqa_score(predictions[q.question_id], human_answers(refs[q.question_id]))
                  for q in questions]
        return {"score": percent(np.mean(scores))}

    def submission(self, predictions, questions, refs, m):
        rows = [{"question_id": int_or_str(q.question_id),
                 "answer": vqa_normalize(predictions[q.question_id])} for q in questions]
        return {"answers_upload.json": json.dumps(rows)}


class TextVQA(VQAv2):
    name = "textvqa"

    def submission(self, predictions, questions, refs, m):
        rows = [{"question_id": int_or_str(q.question_id), "answer": predictions[q.question_id]}
                for q in questions]
        return {"textvqa_answers.json": json.dumps(rows)}


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


# --------------------------------------------------------------------- GQA and shapes-VQA
def gqa_normalize(answer: str) -> str:
    return answer.strip().rstrip(".").lower()


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


def shapes_normalize(text: str) -> str:
    """Lower case, outer whitespace and a final period removed, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


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


class ScienceQA(Benchmark):
    """ScienceQA-IMG: questions as LLaVA's llava_test_CQM-A.json (conversations) or JSON Lines
    {question_id, image, question, choices[, hint]}; references: problems.json ({pid:
    {"answer": index}}) or {question_id, answer: letter}. Questions without an image are
    left out (the IMG subset)."""

    name = "scienceqa"

    def questions(self, path):
        out = []
        for row in read_records(path):
            qid = str(row.get("question_id", row.get("id")))
            if not row.get("image"):
                continue
            if "conversations" in row:  # LLaVA's converted file: the prompt is ready
                text = row["conversations"][0]["value"].replace("<image>", "").strip()
                options = len(re.findall(r"^[A-Z]\. ", text, re.M))  # "A. ..." lines
                out.append(Question(qid, text, row["image"], {"num_options": options}))
            else:
                text = options_prompt(row["question"], row["choices"], row.get("hint", ""))
                out.append(Question(qid, text, row["image"], {"num_options": len(row["choices"])}))
        return out

    @staticmethod
    def answer_letter(ref: dict) -> str:
        answer = ref["answer"]
        return LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()

    def score(self, predictions, questions, refs):
        ok = [letter_of(predictions[q.question_id], q.meta["num_options"])
              == self.answer_letter(refs[q.question_id]) for q in questions]
        return {"score": percent(np.mean(ok))}


def mmmu_choice(response: str, options: list[str], seed_text: str) -> str:
    """MMMU's parse_multi_choice_response: "(X)", then "X" as a word, then an option's text
    (in a response of more than five words); several candidates -> the last mentioned; none
    -> a random letter (seeded by the question id, so scores are reproducible)."""
    letters = list(LETTERS[:len(options)])
    text = " " + response.strip().strip(",.!?;:'") + " "
    candidates = [c for c in letters if f"({c})" in text]
    if not candidates:
        candidates = [c for c in letters if f" {c} " in text]
    by_content = False
    if not candidates and len(text.split()) > 5:
        candidates = [c for c, o in zip(letters, options) if o.lower() in text.lower()]
        by_content = bool(candidates)
    if not candidates:
        return random.Random(zlib.crc32(seed_text.encode())).choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        return max(candidates, key=lambda c: text.lower().rfind(options[letters.index(c)].lower()))
    return max(candidates, key=lambda c: max(text.rfind(f"({c})"), text.rfind(f" {c} ")))


class MMMU(Benchmark):
    """JSON Lines {question_id, image, question, options (list), question_type}; multiple-
    choice answers parsed as MMMU does; open questions: normalised exact match."""

    name = "mmmu"

    def questions(self, path):
        out = []
        for row in read_records(path):
            options = row.get("options") or []
            if isinstance(options, str):
                options = json.loads(options.replace("'", '"'))
            mc = row.get("question_type", "multiple-choice") == "multiple-choice"
            text = options_prompt(row["question"], options) if mc else f"{row['question']}\n{SHORT_ANSWER}"
            out.append(Question(str(row["question_id"]), text, row.get("image"),
                                {"options": options, "multiple_choice": mc}))
        return out

    def parsed(self, q: Question, prediction: str) -> str:
        if q.meta["multiple_choice"]:
            return mmmu_choice(prediction, q.meta["options"], q.question_id)
        return shapes_normalize(prediction)

    def score(self, predictions, questions, refs):
        ok = []
        for q in questions:
            want = refs[q.question_id]["answer"]
            want = want.strip().upper() if q.meta["multiple_choice"] else shapes_normalize(want)
            ok.append(self.parsed(q, predictions[q.question_id]) == want)
        return {"score": percent(np.mean(ok))}

    def submission(self, predictions, questions, refs, m):
        return {"mmmu_predictions.json": json.dumps(
            {q.question_id: self.parsed(q, predictions[q.question_id]) for q in questions})}


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


def yes_label(ref: dict) -> bool:
    label = str(ref.get("label", ref.get("answer", ""))).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"a POPE/MME reference must be yes or no: {str(ref)[:120]}")
    return label == "yes"


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


# ------------------------------------------------------------------------------ MMBench
def mmbench_letter(prediction: str, options: list[str]) -> str | None:
    """MMBench's can_infer: exactly one option letter as a word (punctuation aside), else
    exactly one option's text in the answer; otherwise nothing."""
    letters = LETTERS[:len(options)]
    words = re.sub(r"[.,:;!?()\[\]'\"]", " ", prediction).split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    found = [c for c, o in zip(letters, options) if o.lower() in prediction.lower()]
    return found[0] if len(found) == 1 else None


class MMBench(Benchmark):
    """MMBench's TSV (index, question, hint, A.., answer, category, image as base64). Circular
    evaluation: each question is asked once per rotation of its options and counts as right
    only when every rotation is answered right. The references are the TSV's own answers."""

    name = "mmbench"
    needs_references = False

    def questions(self, path):
        import binascii

        from mqt_jax.data.preprocess import open_image

        csv.field_size_limit(1 << 30)
        out = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                options = [row[c] for c in LETTERS[:8] if row.get(c) not in (None, "", "nan")]
                try:
                    image = open_image(base64.b64decode(row.get("image") or "", validate=True))
                except (binascii.Error, ValueError) as e:
                    raise ValueError(f"{path}: question {row.get('index')}: {e}") from None
                hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else ""
                answer = LETTERS.index(row["answer"].strip()) if row.get("answer") else None
                for r in range(len(options)):  # round r shifts the options by r
                    rotated = options[r:] + options[:r]
                    meta = {"index": row["index"], "round": r, "options": rotated,
                            "question": row["question"], "hint": hint,
                            "category": row.get("category", ""),
                            "answer": None if answer is None else LETTERS[(answer - r) % len(options)]}
                    out.append(Question(f"{row['index']}_r{r}", options_prompt(row["question"], rotated, hint),
                                        image, meta))
        return out

    def references(self, path, questions):
        return {q.question_id: q.meta for q in questions}

    def score(self, predictions, questions, refs):
        rounds = defaultdict(list)
        for q in questions:
            rounds[q.meta["index"]].append(
                mmbench_letter(predictions[q.question_id], q.meta["options"]) == q.meta["answer"])
        circular = {i: all(v) for i, v in rounds.items()}
        category = {q.meta["index"]: q.meta["category"] for q in questions}
        groups = defaultdict(list)
        for i, ok in circular.items():
            groups[category[i]].append(ok)
        return {"score": percent(np.mean(list(circular.values()))),
                "single_round": percent(np.mean([v[0] for v in rounds.values()])),
                **{f"category/{c}": percent(np.mean(v)) for c, v in sorted(groups.items())}}

    def submission(self, predictions, questions, refs, m):
        """Rows as the TSV's with the options rotated and a prediction column; a rotation's
        index is index + round * 1e6 (MMBench's convention for circular copies)."""
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "prediction",
                         "category"])
        for q in questions:
            options = (q.meta["options"] + [""] * 4)[:4]
            writer.writerow([int(q.meta["index"]) + q.meta["round"] * 1_000_000, q.meta["question"],
                             q.meta["hint"], *options,
                             q.meta["answer"], predictions[q.question_id], q.meta["category"]])
        return {"mmbench_predictions.tsv": buf.getvalue()}


# ------------------------------------------------------------- judged by a model: no score
class LLaVABench(Benchmark):
    """Scored by a judge model upstream: only LLaVA's answer file is written."""

    name = "llava_bench"
    needs_references = False

    def references(self, path, questions):
        return {}

    def score(self, predictions, questions, refs):
        return {}


class MMVet(LLaVABench):
    name = "mmvet"

    def submission(self, predictions, questions, refs, m):
        return {"mmvet_results.json": json.dumps({q.question_id: predictions[q.question_id]
                                                  for q in questions}, indent=1)}


BENCHMARKS = {b.name: b for b in (VQAv2(), VizWiz(), TextVQA(), GQA(), ScienceQA(), MMMU(), POPE(),
                                  MME(), MMBench(), LLaVABench(), MMVet(), Shapes())}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
