"""VQAv2 (LLaVA's llava_vqav2_mscoco_test-dev2015.jsonl): the official VQA accuracy, min(#humans who gave the answer / 3, 1) averaged over the 10 choose 9 subsets, after the official answer normalisation."""

from __future__ import annotations

import json
import re

import numpy as np

from mqt_jax.evaluation.benchmarks.base import Benchmark, int_or_str, percent, register

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


@register
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
