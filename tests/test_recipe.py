"""The default `mqt-jax train` (tiny_two_stage.gin), shortened: data generated when absent,
stage 1 -> stage 2 from stage 1's parameters, evaluation per m; then a second invocation
finds every stage complete."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHONUNBUFFERED": "1"}
SHORT = ["--gin_param", "stage1/TrainConfig.steps = 2", "--gin_param", "stage2/TrainConfig.steps = 2",
         "--gin_param", "write_shapes.num_train = 12", "--gin_param", "write_shapes.num_eval = 2",
         "--gin_param", "EvalConfig.m_values = (2,)", "--workdir", "w"]


def mqt_jax(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mqt_jax.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_default_run_generates_data_trains_two_stages_and_evaluates(tmp_path):
    out = mqt_jax("train", *SHORT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data/shapes/eval/questions.jsonl").is_file()
    for stage in ("stage1", "stage2"):
        assert (tmp_path / f"w/{stage}/checkpoints/2").is_dir()
    assert "plain" in (tmp_path / "w/stage1/config.gin").read_text()
    assert f"initialised ['.*'] from {tmp_path / 'w/stage1/checkpoints'}" in out.stdout
    results = json.loads((tmp_path / "w/eval/eval.json").read_text())
    assert list(results["accuracy"]) == ["2", "64"]
    assert set(results["accuracy"]["2"]) == {"all", "coarse", "fine"}
    answers = [json.loads(x) for x in (tmp_path / "w/eval/answers_m2.jsonl").read_text().splitlines()]
    assert len(answers) == 10 and all(a["m"] == 2 for a in answers)
    assert "| majority baseline |" in out.stdout and "| 64 |" in out.stdout

    again = mqt_jax("train", *SHORT, cwd=tmp_path)  # complete: nothing is retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout and "generating" not in again.stdout


def test_bad_setting_fails_before_the_data_is_generated(tmp_path):
    out = mqt_jax("train", "--gin_param", "stage2/MeshConfig.data = 3", "--workdir", "w",
                  cwd=tmp_path)
    assert out.returncode == 2 and "does not divide" in out.stderr
    assert not (tmp_path / "data").exists()
