"""mqt_jax/evaluation/benchmarks/textvqa.py: its official scoring on hand-computed cases, and its file
formats."""

import json

import pytest

from mqt_jax.evaluation import benchmarks as bm
from mqt_jax.evaluation.benchmarks.base import Question


def qs(*ids, **meta):
    return [Question(str(i), f"question {i}", f"{i}.jpg", dict(meta)) for i in ids]


def test_textvqa_reads_its_data_list(tmp_path):
    refs = tmp_path / "TextVQA_0.5.1_val.json"
    refs.write_text(json.dumps({"data": [{"question_id": 7, "answers": ["Nokia"] * 3 + ["nokia 3"] * 7}]}))
    bench = bm.get("textvqa")
    loaded = bench.references(refs, qs(7))
    assert bench.score({"7": "nokia"}, qs(7), loaded)["score"] == pytest.approx(90.0)
