import json

import pytest
from PIL import Image

from mqt_jax.config import ModelConfig, QueryTransformerConfig, VisionConfig
from mqt_jax.evaluate import EvalConfig, m_values_for, sweep_tables, write_collection, write_sweep

RESULTS = {"benchmark": "pope", "questions": 6, "rows": [
    {"m": 1, "score": 50.0, "random": {"f1": 40.0, "yes_ratio": 25.0}, "tflops": 0.5, "prefill_ms": 12.0},
    {"m": 4, "score": 75.25, "random": {"f1": 80.0, "yes_ratio": 50.0}, "tflops": 1.0, "prefill_ms": 20.5}]}


def with_m(num_queries: int, variant: str = "official") -> ModelConfig:
    vision = VisionConfig(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)
    return ModelConfig(vision=vision, query=QueryTransformerConfig(
        variant=variant, num_queries=num_queries, width=32, num_heads=4))


def test_m_values_are_capped_at_M_and_include_it():
    assert m_values_for(EvalConfig(m_values=(1, 4, 36, 64, 144)), with_m(36)) == [1, 4, 36]
    assert m_values_for(EvalConfig(m_values=(2,)), with_m(16)) == [2, 16]
    with pytest.raises(ValueError, match=r"m=\[0\] outside \[1, 16\]"):
        m_values_for(EvalConfig(m_values=(0, 2)), with_m(16))


def test_a_projector_without_m_is_evaluated_at_M_only():
    projector = with_m(16, "mlp2x_gelu")  # 4 x 4 patches: one token each
    assert m_values_for(EvalConfig(m_values=(1, 4)), projector) == [16]
    with pytest.raises(ValueError, match="projector has no m"):
        projector.check_m([4, 16])
    with pytest.raises(ValueError, match="one token per patch"):
        with_m(9, "mlp2x_gelu")


def test_sweep_tables():
    text_csv, text_md = sweep_tables(RESULTS)
    assert text_csv.splitlines() == [
        "benchmark,m,score,random/f1,random/yes_ratio,tflops,prefill_ms",
        "pope,1,50.0,40.0,25.0,0.5,12.0", "pope,4,75.25,80.0,50.0,1.0,20.5"]
    assert text_md.splitlines() == [
        "| m | score | random/f1 | random/yes_ratio | tflops | prefill_ms |", "|---|---|---|---|---|---|",
        "| 1 | 50.0 | 40.0 | 25.0 | 0.5 | 12.0 |", "| 4 | 75.2 | 80.0 | 50.0 | 1.0 | 20.5 |"]


def test_majority_baseline_row_and_small_numbers():
    results = {"benchmark": "shapes", "questions": 2, "majority_baseline": {"score": 40.0, "fine": 30.0},
               "rows": [{"m": 2, "score": 55.0, "fine": 50.0, "tflops": 0.000431, "prefill_ms": 3.0}]}
    lines = sweep_tables(results)[1].splitlines()
    assert lines[2] == "| 2 | 55.0 | 50.0 | 0.000431 | 3.0 |"
    assert lines[3] == "| majority baseline | 40.0 | 30.0 |  |  |"


def test_sweep_files_and_the_collection_over_benchmarks(tmp_path):
    write_sweep(RESULTS, tmp_path / "pope")  # as evaluate() leaves them
    other = {"benchmark": "gqa", "questions": 3, "rows": [
        {"m": 1, "score": 30.0, "tflops": 0.5, "prefill_ms": 11.0}]}
    write_sweep(other, tmp_path / "gqa")
    assert json.loads((tmp_path / "pope/eval.json").read_text()) == RESULTS
    assert Image.open(tmp_path / "pope/eval.png").size == (768, 480)
    write_collection(tmp_path)
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "benchmark,m,score,tflops,prefill_ms", "gqa,1,30.0,0.5,11.0",
        "pope,1,50.0,0.5,12.0", "pope,4,75.25,1.0,20.5"]
    md = (tmp_path / "sweep.md").read_text()
    assert "### gqa" in md and "### pope" in md
    assert Image.open(tmp_path / "sweep.png").size == (768, 480)
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically
