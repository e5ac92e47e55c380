"""Sweep files expand into runs; complete runs are skipped; results collect into one table."""

import csv
import json

import jax
import pytest

from mqt_jax import cli
from mqt_jax.config import Sweep
from mqt_jax.research import sweep

SWEEP = """
Sweep.base = ["tiny_two_stage.gin"]
Sweep.common = ["stage2/TrainConfig.steps = 3"]
Sweep.methods = {
    "MQT (one model)": {"QueryTransformerConfig.variant": "official"},
    "avgpool": {"QueryTransformerConfig.variant": "avgpool", "M": [1, 4],
                "MSampler.distribution": "constant"},
}
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "s.gin"
    path.write_text(SWEEP)
    return str(path)


def test_a_list_valued_binding_is_swept(sweep_file):
    spec, runs = sweep.load_sweep(sweep_file)
    assert [r.name for r in runs] == ["mqt-one-model", "avgpool_m1", "avgpool_m4"]
    assert [r.method for r in runs] == ["MQT (one model)", "avgpool", "avgpool"]
    assert runs[2].bindings == ("stage2/TrainConfig.steps = 3",
                                "QueryTransformerConfig.variant = 'avgpool'",
                                "MSampler.distribution = 'constant'", "M = 4")
    assert sweep.gin_value("@VisionConfig()") == "@VisionConfig()" and sweep.gin_value("a") == "'a'"


def test_bad_sweeps_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Sweep.methods is empty"):
        Sweep()
    with pytest.raises(ValueError, match=r"methods\['x'\] must map bindings"):
        Sweep(methods={"x": ["M = 1"]})
    with pytest.raises(ValueError, match="two runs share a folder name"):
        sweep.expand(Sweep(methods={"a b": {"M": 1}, "a-b": {"M": 2}}))


def fake_eval(run_dir, rows, majority=20.0):
    out = run_dir / "eval" / "shapes"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps(
        {"benchmark": "shapes", "questions": 10, "majority_baseline": {"score": majority},
         "rows": rows}))


def test_print_commands_lists_the_incomplete_runs(sweep_file, tmp_path, capsys):
    fake_eval(tmp_path / "w" / "avgpool_m1", [{"m": 1, "tokens": 1, "score": 30.0, "tflops": 1e-4}])
    assert cli.main(["sweep", "--sweep", sweep_file, "--workdir", str(tmp_path / "w"),
                     "--print_commands", "--launcher", "launch/tpu_vm.sh --name n --"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and "2 of 3 runs to launch" in out.err
    assert lines[1].startswith("launch/tpu_vm.sh --name n -- mqt-jax train --gin_file tiny_two_stage.gin")
    assert "--gin_param 'M = 4'" in lines[1] and lines[1].endswith("/w/avgpool_m4")


def test_complete_runs_are_skipped_and_collected(sweep_file, tmp_path, capsys):
    w = tmp_path / "w"
    fake_eval(w / "mqt-one-model", [{"m": m, "tokens": m, "score": s, "tflops": t, "stderr": {"score": 1.5}}
                                    for m, s, t in [(1, 40.0, 1e-4), (4, 50.0, 2e-4), (64, 60.0, 9e-4)]])
    fake_eval(w / "avgpool_m1", [{"m": 1, "tokens": 1, "score": 30.0, "tflops": 1e-4}])
    fake_eval(w / "avgpool_m4", [{"m": 4, "tokens": 4, "score": 45.5, "tflops": 2e-4}])
    cache_dir = jax.config.jax_compilation_cache_dir
    rows = sweep.run_all(sweep_file, w)  # nothing left to train
    assert jax.config.jax_compilation_cache_dir == cache_dir  # the sweep's cache was scoped
    assert "3 complete, 0 to run" in capsys.readouterr().out
    assert [(r["run"], r["tokens"], r["score"]) for r in rows] == [
        ("mqt-one-model", 1, 40.0), ("mqt-one-model", 4, 50.0), ("mqt-one-model", 64, 60.0),
        ("avgpool_m1", 1, 30.0), ("avgpool_m4", 4, 45.5)]
    with open(w / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[4]["method"] == "avgpool" and table[4]["score"] == "45.5"
    assert float(table[4]["gflops"]) == pytest.approx(0.2) and table[4]["stderr"] == ""
    assert float(table[0]["stderr"]) == 1.5
    assert int(table[0]["llm_params"]) == 2 * 512 * 256 + 4 * (256 * 2 * (256 + 128) + 3 * 256 * 688 + 512) + 256
    md = (w / "results.md").read_text()
    assert "| method | 1 | 4 | 64 |" in md
    assert "| MQT (one model) | 40.0 ± 1.5 | 50.0 ± 1.5 | 60.0 ± 1.5 |" in md and "| avgpool | 30.0 | 45.5 |  |" in md
    assert "Majority-answer baseline: 20.0" in md
    assert (w / "results.png").stat().st_size > 10_000 and (w / "results.pdf").is_file()


def test_persistent_cache_is_scoped_to_the_sweep(tmp_path):
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, n) for n in names]
    with sweep.persistent_cache(tmp_path / "cache"):
        assert [getattr(jax.config, n) for n in names] == [str(tmp_path / "cache"), 0.5]
    assert [getattr(jax.config, n) for n in names] == before


@pytest.mark.parametrize("name,runs", [("compressors_shapes", 17), ("m_distribution", 5),
                                       ("llm_size", 4)])
def test_shipped_sweeps_expand_into_valid_models(name, runs):
    """Every run of a shipped sweep passes the recipe's own checks: each stage builds its model,
    m sampler and Trainer."""
    from mqt_jax.cli import parse_gin
    from mqt_jax.config import Recipe
    from mqt_jax.training.recipe import check_stages

    spec, expanded = sweep.load_sweep(f"sweeps/{name}.gin")
    assert len(expanded) == runs
    for r in expanded:
        parse_gin(list(spec.base), list(r.bindings))
        check_stages(Recipe())  # what `mqt-jax train` checks before any work
