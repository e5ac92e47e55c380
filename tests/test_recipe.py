"""The default `mqt-jax train` (tiny_two_stage.gin), shortened: data generated when absent,
stage 1 -> stage 2 from stage 1's parameters, evaluation per m; then a second invocation
finds every stage complete."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mqt_jax import cli

ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHONUNBUFFERED": "1"}
SHORT = ["--gin_param", "stage1/TrainConfig.steps = 2", "--gin_param", "stage2/TrainConfig.steps = 2",
         "--gin_param", "CLIPConfig.steps = 2", "--gin_param", "CLIPConfig.batch_size = 8",
         "--gin_param", "pretrain_llm/TrainConfig.steps = 2",
         "--gin_param", "ShapesConfig.num_train = 12", "--gin_param", "ShapesConfig.num_eval = 2",
         "--gin_param", "EvalConfig.m_values = (2,)", "--workdir", "w"]


def mqt_jax(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mqt_jax.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The shortened default run in a fresh folder: (folder, its output)."""
    tmp_path = tmp_path_factory.mktemp("default_run")
    return tmp_path, mqt_jax("train", *SHORT, cwd=tmp_path)


@pytest.mark.slow
def test_default_run_generates_data_trains_two_stages_and_evaluates(default_run):
    tmp_path, out = default_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data/shapes/eval/questions.jsonl").is_file()
    for stage in ("stage1", "stage2"):
        assert (tmp_path / f"w/{stage}/checkpoints/2").is_dir()
    assert "plain" in (tmp_path / "w/stage1/config.gin").read_text()
    assert f"initialised ['.*'] from {tmp_path / 'w/stage1/checkpoints'}" in out.stdout
    results = json.loads((tmp_path / "w/eval/shapes/eval.json").read_text())
    assert [r["m"] for r in results["rows"]] == [2, 64]
    assert {"score", "coarse", "fine", "tflops", "prefill_ms"} <= set(results["rows"][0])
    assert results["rows"][0]["tflops"] < results["rows"][1]["tflops"]
    answers = [json.loads(x) for x in (tmp_path / "w/eval/shapes/answers_m2.jsonl").read_text().splitlines()]
    assert len(answers) == 10 and all(a["metadata"] == {"m": 2} for a in answers)
    assert "| majority baseline |" in out.stdout and "| 64 |" in out.stdout
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "w/eval" / name).is_file()

    # Stage 0 went to the data folder: the CLIP tower as transformers would save it, converted
    # like any CLIP tower; stage 1 started from it and from the pretrained LLM.
    pretrained = tmp_path / "data/shapes/pretrained"
    assert json.loads((pretrained / "clip-vit/config.json").read_text())["model_type"] == "clip_vision_model"
    assert (pretrained / "clip/checkpoints/0").is_dir() and (pretrained / "llm/checkpoints/2").is_dir()
    assert "'lm'" in (pretrained / "llm/config.gin").read_text()
    assert f"initialised ['vision_tower'] from {pretrained / 'clip/checkpoints'}" in out.stdout
    assert f"initialised ['llm'] from {pretrained / 'llm/checkpoints'}" in out.stdout
    assert results["step"] == 2 and results["run"] == str(tmp_path / "w/stage2")
    assert results["config"] == str(tmp_path / "w/stage2/config.gin") and "date" in results
    assert "By question type" in (tmp_path / "w/eval/shapes/eval.md").read_text()

    # Complete: nothing is retrained, nothing evaluated again, and it says so.
    again = mqt_jax("train", *SHORT, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generating" not in again.stdout and "retrieval accuracy" not in again.stdout
    assert "(cached)" in again.stdout and "resumed from step 2" in again.stdout
    assert "complete: " in again.stdout and "== eval" not in again.stdout

    # Another compressor (M3, its scales sampled) in another workdir: stage 0 is reused, its
    # LLM taken into a model of another shape; the m evaluated are M3's.
    m3 = [*SHORT[:-2], "--workdir", "w_m3", "--gin_param", "QueryTransformerConfig.variant = 'm3'",
          "--gin_param", "MSampler.distribution = 'fixed_set'",
          "--gin_param", "MSampler.values = (1, 4, 16, 64)", "--gin_param", "EvalConfig.m_values = (4,)"]
    other = mqt_jax("train", *m3, cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.count("(cached)") == 2 and "retrieval accuracy" not in other.stdout
    assert f"initialised ['llm'] from {pretrained / 'llm/checkpoints'}" in other.stdout
    rows = json.loads((tmp_path / "w_m3/eval/shapes/eval.json").read_text())["rows"]
    assert [r["m"] for r in rows] == [4, 64]


def test_a_shapes_folder_from_an_older_version_is_named(tmp_path):
    (tmp_path / "data/shapes").mkdir(parents=True)  # a folder without stage 0's text corpus
    out = mqt_jax("train", "--workdir", "w", cwd=tmp_path)
    assert out.returncode == 2 and "shapes_text.json' does not exist (data/shapes was written " \
        "by an older version: remove it and it is generated again)" in out.stderr
    assert not (tmp_path / "w").exists()


def test_bad_setting_fails_before_the_data_is_generated(tmp_path):
    out = mqt_jax("train", "--gin_param", "stage2/MeshConfig.data = 3", "--workdir", "w",
                  cwd=tmp_path)
    assert out.returncode == 2 and "does not divide" in out.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_inference_commands_on_a_trained_run(default_run, monkeypatch, capsys):
    """generate / eval / gradcam as a user runs them on the default run's workdir (in this
    process: the run above already covers start-up from the shell)."""
    tmp_path, out = default_run
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    image = "data/shapes/images/eval/000000.png"
    question = json.loads(open("data/shapes/eval/questions.jsonl").readline())["text"]
    assert cli.main(["generate", "--workdir", "w", "--image", image, "--prompt", question,
                     "--m", "1,64", "--max_new_tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[-2:]] == ["m=1", "m=64"]

    assert cli.main(["eval", "--workdir", "w", "--m", "2", "--out", "ev"]) == 0  # no other flags
    rows = json.loads(open("ev/shapes/eval.json").read())["rows"]
    assert [r["m"] for r in rows] == [2, 64]
    assert open("ev/sweep.csv").read().splitlines()[0] == "benchmark,m,score,tflops,prefill_ms"

    # Another benchmark into the same folder: POPE-style yes/no questions on shapes images.
    with open("pope.jsonl", "w") as q, open("pope_labels.jsonl", "w") as a:
        for i, (split, colour, label) in enumerate([("random", "red", "yes"), ("random", "blue", "no"),
                                                    ("popular", "green", "no")]):
            q.write(json.dumps({"question_id": i, "image": "eval/000000.png", "category": split,
                                "text": f"Is there a {colour} shape?"}) + "\n")
            a.write(json.dumps({"question_id": i, "label": label}) + "\n")
    assert cli.main(["eval", "--workdir", "w", "--benchmark", "pope", "--questions", "pope.jsonl",
                     "--answers", "pope_labels.jsonl", "--images", "data/shapes/images",
                     "--m", "2", "--out", "ev"]) == 0
    pope = json.loads(open("ev/pope/eval.json").read())["rows"][0]
    assert {"score", "random", "popular"} <= set(pope) and set(pope["random"]) == {
        "accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert {line.split(",")[0] for line in open("ev/sweep.csv").read().splitlines()[1:]} == {"pope", "shapes"}

    assert cli.main(["gradcam", "--workdir", "w", "--image", image, "--prompt", question,
                     "--m", "1,64", "--max_new_tokens", "4", "--out", "cam.png", "--answer", "3"]) == 0
    assert open("cam.pdf", "rb").read(4) == b"%PDF"
    assert Image.open("cam.png").size[0] > Image.open("cam.png").size[1]  # one row of panels

    assert cli.main(["generate", "--workdir", "w", "--image", image, "--prompt", "x", "--m", "65"]) == 2
    assert "m=[65] outside [1, 64]" in capsys.readouterr().err
    assert cli.main(["gradcam", "--workdir", "w", "--image", image, "--prompt", "x", "--m", "64",
                     "--out", "avg.png", "--gin_param", "QueryTransformerConfig.variant = 'avgpool'"]) == 2
    assert "the avgpool compressor has none" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", "nowhere"]) == 2
    assert "no config.gin in nowhere" in capsys.readouterr().err


def test_an_eval_json_written_by_mqt_jax_eval_counts_as_done(tmp_path, monkeypatch):
    """`mqt-jax eval` reads the paths absolute from the run's config.gin, `train` as the gin
    files give them: the same evaluation either way, not evaluated again."""
    import dataclasses

    from mqt_jax.config import EvalConfig
    from mqt_jax.training import recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipe, "latest_step", lambda run: 7)
    config = EvalConfig(questions="data/q.jsonl", answers="data/a.jsonl", val_questions="data/v.jsonl")
    by_eval = dataclasses.asdict(config) | {"questions": str(tmp_path / "data/q.jsonl"),
                                            "answers": str(tmp_path / "data/a.jsonl"),
                                            "val_questions": str(tmp_path / "data/v.jsonl")}
    (tmp_path / "eval.json").write_text(json.dumps({"run": str(tmp_path / "w"), "step": 7,
                                                    "eval_config": by_eval}))
    assert recipe.scored(tmp_path / "w", tmp_path, config)["step"] == 7
    other = dataclasses.replace(config, questions="data/other.jsonl")
    assert recipe.scored(tmp_path / "w", tmp_path, other) is None
