"""Ahead-of-time compilation for a TPU slice on this CPU host (needs libtpu)."""

import importlib.util
import json

import pytest

from mqt_jax import aot, cli

TINY_LLM_PARAMS = 3_164_416  # tests/test_configs.py builds the same config


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_v5p_slice(tmp_path, capsys, monkeypatch):
    pytest.importorskip("libtpu")
    out = tmp_path / "report.json"
    assert cli.main(["aot", "--gin_file", "tiny.gin", "--topology", "v5p:2x2x1",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    mem = report["memory_per_chip"]
    assert 0 < mem["arguments_gib"] < mem["total_gib"] < 1 and report["fits"]
    assert report["analytical_flops_6NT"] == 6 * TINY_LLM_PARAMS * 8 * 96
    assert report["xla_flops_per_chip_scan_bodies_once"] > 0
    assert "GiB of 95 GiB HBM" in capsys.readouterr().out

    # The same program on a chip with too little memory is reported, not silently accepted.
    monkeypatch.setitem(aot.CHIPS, "v5p", {"hbm_gib": 0.001, "peak_tflops": 459})
    assert cli.main(["aot", "--gin_file", "tiny.gin", "--topology", "v5p:2x2x1",
                     "--out", str(tmp_path / "small.json")]) == 3
    assert "needs" in capsys.readouterr().err


def test_unknown_chip_is_named():
    with pytest.raises(ValueError, match="chip 'v9z' unknown"):
        aot.chip_of("v9z:2x2")


def test_missing_libtpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert cli.main(["aot", "--gin_file", "tiny.gin", "--topology", "v5p:2x2x1"]) == 2
    assert "needs libtpu" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_lists_what_fits_and_names_the_fewest_flops(tmp_path, capsys):
    pytest.importorskip("libtpu")
    out = tmp_path / "tune.json"
    assert cli.main(["aot", "--gin_file", "tiny.gin", "--topology", "v5p:2x2x1", "--tune",
                     "--remat", "nothing_saveable,dots_saveable", "--rows_per_chip", "1,2",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["configurations"]
    assert [(r["remat_policy"], r["batch_size"]) for r in rows] == [
        ("nothing_saveable", 4), ("nothing_saveable", 8), ("dots_saveable", 4), ("dots_saveable", 8)]
    assert all(r["fits"] for r in rows)
    # recomputing the forward costs FLOPs; the larger batch breaks the tie
    assert rows[0]["flops_per_token"] > rows[2]["flops_per_token"]
    assert report["fastest"] == rows[3]
    assert "| dots_saveable | 2 | 8 |" in capsys.readouterr().out


def test_tune_refuses_an_unknown_policy_before_compiling(capsys):
    assert cli.main(["aot", "--gin_file", "tiny.gin", "--topology", "v5p:2x2x1", "--tune",
                     "--remat", "dots,nothing_saveable"]) == 2
    assert "--remat dots: expected some of" in capsys.readouterr().err
