"""`mqt-jax train` as a user runs it, in a subprocess; the command line's gin handling."""

import json
import os
import subprocess
import sys

import pytest

from mqt_jax import cli

ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHONUNBUFFERED": "1"}


def mqt_jax(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mqt_jax.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_writes_operative_config_and_metrics(tmp_path):
    out = mqt_jax("train", "--gin_file", "tiny.gin", "--gin_param", "TrainConfig.steps = 12",
                  "--gin_param", "TrainConfig.log_every = 2", "--workdir", "w", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train step compiled 1x" in out.stdout
    assert "12/12" in out.stderr  # the progress bar ran to the end
    config = (tmp_path / "w" / "config.gin").read_text()
    assert "TrainConfig.steps = 12" in config and "LLMConfig.hidden = 256" in config
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for row in rows:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec"} <= set(row)
        assert row["tokens_per_sec"] > 0 and row["grad_norm"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # the synthetic task is being learned
    assert any(k.startswith("loss_m/") for k in rows[-1])  # the loss split by m range
    events = list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 1000


@pytest.mark.parametrize("param,message", [
    ("MeshConfig.data = 3", "does not divide 1 devices"),
    ("QueryTransformerConfig.variant = 'perceiver'", "variant='perceiver'"),
    ("MSampler.distribution = 'normal'", "distribution='normal'"),
])
def test_bad_settings_fail_fast_with_the_value_named(tmp_path, param, message):
    out = mqt_jax("train", "--gin_param", param, "--workdir", "w", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_train_on_shapes_reports_skipped_records(tmp_path):
    out = mqt_jax("data", "shapes", "--out", "data/shapes", "--num_train", "40", "--num_eval", "2",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    qa = tmp_path / "data/shapes/shapes_qa.json"
    records = json.loads(qa.read_text())
    records.insert(3, {**records[0], "id": "lost", "image": "train/nowhere.png"})
    qa.write_text(json.dumps(records))
    out = mqt_jax("train", "--gin_file", "tiny_shapes.gin", "--gin_param", "TrainConfig.steps = 2",
                  "--gin_param", "EvalConfig.m_values = (1,)", "--workdir", "w", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped/missing_image"] == 1
    assert "data/shapes/shapes_qa.json" in (tmp_path / "w/config.gin").read_text()
    # ... and the single-stage run is evaluated at m = 1 and M = 64 on the 10 held-out questions
    results = json.loads((tmp_path / "w/eval/shapes/eval.json").read_text())
    assert [r["m"] for r in results["rows"]] == [1, 64]
    for m in (1, 64):
        answers = (tmp_path / f"w/eval/shapes/answers_m{m}.jsonl").read_text().splitlines()
        assert len(answers) == 10
    assert "| majority baseline |" in out.stdout


def test_overrides_are_bound_in_the_runs_stage_scope():
    assert cli.in_scope("MeshConfig.fsdp = 4", "stage2") == "stage2/MeshConfig.fsdp = 4"
    assert cli.in_scope(" MeshConfig.fsdp=4 ", "stage2") == "stage2/MeshConfig.fsdp=4"
    assert cli.in_scope("stage1/MeshConfig.fsdp = 4", "stage2") == "stage1/MeshConfig.fsdp = 4"
    assert cli.in_scope("M = 16", "stage2") == "M = 16"  # a macro
    assert cli.in_scope("MeshConfig.fsdp = 4", "") == "MeshConfig.fsdp = 4"


@pytest.mark.slow
def test_eval_m_auto_calibrates_trains_saves_and_reuses_its_policies(tmp_path):
    out = mqt_jax("data", "shapes", "--out", "data/shapes", "--num_train", "12", "--num_eval", "4",
                  "--num_val", "4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    out = mqt_jax("train", "--gin_file", "tiny_shapes.gin", "--gin_param", "TrainConfig.steps = 2",
                  "--gin_param", "EvalConfig.questions = ''", "--workdir", "w", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    auto = ("eval", "--workdir", "w", "--m", "auto", "--out", "out", "--questions",
            "data/shapes/eval/questions.jsonl", "--answers", "data/shapes/eval/answers.jsonl")
    missing = mqt_jax(*auto, "--train_questions", "nowhere.jsonl", cwd=tmp_path)
    assert missing.returncode == 2 and "--train_questions nowhere.jsonl not found" in missing.stderr
    unsplit = mqt_jax(*auto, "--gin_param", "EvalConfig.train_questions = ''", cwd=tmp_path)
    assert unsplit.returncode == 2 and "training the router needs --train_questions" in unsplit.stderr
    assert "calibrate on validation" not in unsplit.stderr  # said before any answer
    out = mqt_jax(*auto, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "calibrate on validation" in out.stderr and "router: training questions" in out.stderr
    results = json.loads((tmp_path / "out/shapes/policies.json").read_text())
    assert results["questions"] == 20 and results["ladder"] == [2, 8, 32, 64]
    names = [r["policy"] for r in results["rows"]]
    assert [n for n in names if n.startswith("m = ")] == [f"m = {m}" for m in (1, 2, 4, 8, 16, 32, 36, 64)]
    assert sum(n.startswith("escalate") and "saved, what m=auto uses" in n for n in names) == 1
    assert any(n.startswith("router") for n in names) and names[-1] == "oracle"
    # run for real, the escalation stops where its replay on the sweep does, and both policies
    # answer with the tokens a fresh answer at the chosen m gives
    assert results["escalate_run_agrees"] == results["escalate_run_answers_equal"] == 20
    assert results["router_run_answers_equal"] == 20
    rows = {r["policy"]: r for r in results["rows"]}
    assert results["router"]["train_questions"] == 60  # 12 training images x 5 questions
    for m in results["ladder"]:  # the oracle is never worse than a rung of its ladder
        assert rows["oracle"]["accuracy"] >= rows[f"m = {m}"]["accuracy"]
    for name in ("policies.md", "policies.png", "policies.pdf"):
        assert (tmp_path / "out/shapes" / name).stat().st_size > 0
    assert "| oracle |" in out.stdout and "| majority baseline |" in out.stdout
    saved = {f: (tmp_path / "w" / f).read_bytes() for f in ("policy.json", "router.json")}
    again = mqt_jax(*auto, cwd=tmp_path)  # the saved policies are reused, not fitted again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "calibrate on validation" not in again.stderr and "router: training" not in again.stderr
    assert saved == {f: (tmp_path / "w" / f).read_bytes() for f in saved}
