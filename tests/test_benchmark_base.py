"""mqt_jax/evaluation/benchmarks/base.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks import base as this
from mqt_jax.evaluation.benchmarks.base import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


def test_missing_reference_is_named(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"question_id": "1", "answers": ["a"] * 10}) + "\n")
    with pytest.raises(ValueError, match="no reference answer for 1 questions .first: '2'"):
        bm.get("vqav2").references(refs, qs(1, 2))


def test_unknown_benchmark_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="benchmark 'vqa3'"):
        bm.get("vqa3")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="q.jsonl:2: not JSON"):
        this.llava_questions(bad)
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match=r"lacks \['text'\]"):
        this.llava_questions(bad)
