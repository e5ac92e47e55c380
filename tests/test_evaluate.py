import json

import pytest
from PIL import Image

from mqt_jax.compressors import check
from mqt_jax.config import EvalConfig, ModelConfig, QueryTransformerConfig, VisionConfig
from mqt_jax.evaluation.evaluate import m_values_for, sweep_tables, write_collection, write_sweep

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
    with pytest.raises(ValueError, match="one token per patch"):  # where a model is built
        check(with_m(9, "mlp2x_gelu"))


def test_sweep_tables():
    text_csv, text_md = sweep_tables(RESULTS)
    assert text_csv.splitlines() == [
        "benchmark,m,score,random/f1,random/yes_ratio,tflops,prefill_ms",
        "pope,1,50.0,40.0,25.0,0.5,12.0", "pope,4,75.25,80.0,50.0,1.0,20.5"]
    assert text_md.splitlines() == [  # cost shown in GFLOPs
        "| m | score | random/f1 | random/yes_ratio | GFLOPs | prefill_ms |", "|---|---|---|---|---|---|",
        "| 1 | 50.0 | 40.0 | 25.0 | 500 | 12.0 |", "| 4 | 75.2 | 80.0 | 50.0 | 1000 | 20.5 |"]


def test_standard_errors_and_the_table_by_question_type():
    row = lambda m, score, se, count: {  # noqa: E731
        "m": m, "score": score, "fine": score, "stderr": {"score": se, "fine": 2 * se},
        "by_type": {"count": count, "colour_at": 30.0}, "by_type_stderr": {"count": 1.25, "colour_at": 4.0},
        "tflops": 0.00043, "prefill_ms": 3.0}
    results = {"benchmark": "shapes", "questions": 10, "rows": [row(1, 50.0, 1.3, 20.0), row(64, 80.0, 1.0, 60.0)],
               "majority_baseline": {"score": 40.0, "fine": 30.0, "stderr": {"score": 1.0},
                                     "by_type": {"count": 26.3, "colour_at": 22.0}}}
    text_csv, text_md = sweep_tables(results)
    assert text_csv.splitlines()[0] == ("benchmark,m,score,fine,stderr/score,stderr/fine,by_type/count,"
                                        "by_type/colour_at,by_type_stderr/count,by_type_stderr/colour_at,"
                                        "tflops,prefill_ms")
    assert text_md.splitlines() == [
        "| m | score | fine | GFLOPs | prefill_ms |", "|---|---|---|---|---|",
        "| 1 | 50.0 ± 1.3 | 50.0 ± 2.6 | 0.43 | 3.0 |", "| 64 | 80.0 ± 1.0 | 80.0 ± 2.0 | 0.43 | 3.0 |",
        "| majority baseline | 40.0 | 30.0 |  |  |", "",
        "By question type (exact match %, ± standard error):", "",
        "| type | m = 1 | m = 64 | majority |", "|---|---|---|---|",
        "| count | 20.0 ± 1.2 | 60.0 ± 1.2 | 26.3 |", "| colour_at | 30.0 ± 4.0 | 30.0 ± 4.0 | 22.0 |"]


def test_majority_baseline_row_and_small_numbers():
    results = {"benchmark": "shapes", "questions": 2, "majority_baseline": {"score": 40.0, "fine": 30.0},
               "rows": [{"m": 2, "score": 55.0, "fine": 50.0, "tflops": 0.000431, "prefill_ms": 3.0}]}
    lines = sweep_tables(results)[1].splitlines()
    assert lines[2] == "| 2 | 55.0 | 50.0 | 0.431 | 3.0 |"
    assert lines[3] == "| majority baseline | 40.0 | 30.0 |  |  |"


def test_sweep_files_and_the_collection_over_benchmarks(tmp_path):
    write_sweep(RESULTS, tmp_path / "pope")  # as evaluate() leaves them
    other = {"benchmark": "gqa", "questions": 3, "rows": [
        {"m": 1, "score": 30.0, "tflops": 0.5, "prefill_ms": 11.0}]}
    write_sweep(other, tmp_path / "gqa")
    assert json.loads((tmp_path / "pope/eval.json").read_text()) == RESULTS
    assert Image.open(tmp_path / "pope/eval.png").size == (768, 480)
    assert (tmp_path / "pope/eval.pdf").read_bytes().startswith(b"%PDF")
    write_collection(tmp_path)
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "benchmark,m,score,tflops,prefill_ms", "gqa,1,30.0,0.5,11.0",
        "pope,1,50.0,0.5,12.0", "pope,4,75.25,1.0,20.5"]
    md = (tmp_path / "sweep.md").read_text()
    assert "### gqa" in md and "### pope" in md
    assert Image.open(tmp_path / "sweep.png").size == (768, 480)
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically
