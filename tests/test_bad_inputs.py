"""Bad input, one case a line: the exit code (2), a one-line message naming the culprit, and
no traceback; damaged checkpoints fall back to the newest intact one. Commands run in this
process (cli.main) on 8 simulated devices; the few that need a real process (signals) run in
a subprocess. Data records are in tests/test_pipeline.py (every good record arrives once)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mqt_jax import cli
from mqt_jax.config import MeshConfig

TINY = ["--gin_file", "tiny.gin"]


def fails(argv, culprit, capsys, code=2):
    """Runs `mqt-jax ARGV`; asserts the exit code and one error line naming the culprit."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mqt-jax ")]
    assert len(lines) == 1 and culprit in lines[0], err[-2000:]
    assert "Traceback" not in err
    return lines[0]


# ---- settings: refused before anything is generated or compiled ----
@pytest.mark.parametrize("binding,culprit", [
    ("TrainConfig.max_to_keep = 0", "TrainConfig.max_to_keep=0: must be a number >= 1 (the final checkpoint must be kept)"),
    ("TrainConfig.steps = 0", "TrainConfig.steps=0"),
    ("TrainConfig.steps = -5", "TrainConfig.steps=-5"),
    ("TrainConfig.learning_rate = -0.1", "TrainConfig.learning_rate=-0.1"),
    ("TrainConfig.log_every = 0", "TrainConfig.log_every=0"),
    ("TrainConfig.batch_size = 0", "TrainConfig.batch_size=0"),
    ("TrainConfig.images_per_row = 0", "TrainConfig.images_per_row=0"),
    ("TrainConfig.grad_accum_steps = 0", "TrainConfig.grad_accum_steps=0"),
    ("TrainConfig.checkpoint_every = -1", "TrainConfig.checkpoint_every=-1"),
    ("TrainConfig.warmup_fraction = 2.0", "TrainConfig.warmup_fraction=2.0"),
    ("TrainConfig.trainable = ('query_transformr',)", "'query_transformr' matches no parameter"),
    ("TrainConfig.trainable = 'llm'", "TrainConfig.trainable='llm': a tuple of regexes"),
    ("TrainConfig.trainable = ('llm[',)", "'llm[' is not a regex"),
    ("TrainConfig.seq_len = 60", "TrainConfig.seq_len=60 leaves no room for text"),
    ("ModelConfig.dtype = 'float17'", "ModelConfig.dtype='float17'"),
    ("ModelConfig.param_dtype = 'int8'", "ModelConfig.param_dtype='int8'"),
    ("LLMConfig.num_heads = 0", "LLMConfig.num_heads=0"),
    ("VisionConfig.num_layers = 0", "VisionConfig.num_layers=0"),
    ("TrainConfig.steps = (", "--gin_param 'TrainConfig.steps = ('"),
    ("Nonexistent.value = 1", "No configurable matching 'Nonexistent'"),
    ("EvalConfig.questions = 'nowhere/questions.jsonl'", "EvalConfig.questions='nowhere/questions.jsonl' does not exist"),
    ("DataConfig.data_path = 'nowhere.json'", "DataConfig.data_path='nowhere.json' does not exist"),
    ("CLIPConfig.steps = 0", "CLIPConfig.steps=0"),
    ("TrainConfig.init_from = {'a': 'llm'}", "TrainConfig.init_from['a']='llm': a tuple of regexes"),
    ("TrainConfig.init_from = {'nowhere': ('llm',)}", "TrainConfig.init_from: 'nowhere' does not exist"),
    # numbers: finite, of their type, in range; refused before anything compiles
    ("TrainConfig.learning_rate = 1e999", "TrainConfig.learning_rate=inf: must be a finite number"),
    ("TrainConfig.steps = 2.5", "TrainConfig.steps=2.5: must be an integer"),
    ("LLMConfig.rms_norm_eps = -1.0", "LLMConfig.rms_norm_eps=-1.0: must be > 0"),
    ("LLMConfig.rms_norm_eps = '1e-6'", "LLMConfig.rms_norm_eps='1e-6': must be a finite number"),
    ("LLMConfig.rope_theta = 0.0", "LLMConfig.rope_theta=0.0: must be > 0"),
    ("LoRAConfig.alpha = 1e999", "LoRAConfig.alpha=inf: must be a finite number"),
    ("LoRAConfig.rank = True", "LoRAConfig.rank=True: must be an integer"),
    ("LoRAConfig.dropout = 'x'", "LoRAConfig.dropout='x': must be a finite number"),
    ("VisionConfig.layer_norm_eps = 0.0", "VisionConfig.layer_norm_eps=0.0: must be > 0"),
])
def test_bad_setting(tmp_path, monkeypatch, capsys, binding, culprit):
    monkeypatch.chdir(tmp_path)
    fails(["train", *TINY, "--gin_param", binding, "--workdir", "w"], culprit, capsys)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_nan_setting_is_refused_where_gin_cannot_write_one():
    from mqt_jax.config import LLMConfig, SamplingConfig, TrainConfig

    for make, name in ((lambda: TrainConfig(learning_rate=float("nan")), "learning_rate"),
                       (lambda: LLMConfig(rms_norm_eps=float("nan")), "rms_norm_eps"),
                       (lambda: SamplingConfig(temperature=float("nan")), "temperature")):
        with pytest.raises(ValueError, match=f"{name}=nan: must be a finite number"):
            make()


@pytest.mark.parametrize("argv", [["train", *TINY, "--workdir", "a_file"],
                                  ["eval", "--workdir", ".", "--out", "a_file"],
                                  ["data", "shapes", "--out", "a_file"]])
def test_a_folder_flag_naming_a_file_is_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("keep me")
    flag = argv[argv.index("a_file") - 1]
    fails(argv, f"{flag} a_file is a file; it names a folder", capsys)
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_data_shapes_onto_a_full_disk_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from mqt_jax.data import shapes

    real, drawn = shapes.draw, []

    def draw_until_full(*args, **kw):
        drawn.append(1)
        if len(drawn) > 5:
            raise OSError(errno.ENOSPC, "No space left on device", "images/train/000005.png")
        return real(*args, **kw)

    monkeypatch.setattr(shapes, "draw", draw_until_full)
    fails(["data", "shapes", "--out", str(tmp_path / "shapes"), "--num_train", "20"],
          "images/train/000005.png: No space left on device", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no shapes.partial left


def test_a_gin_file_that_includes_itself_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop.gin").write_text("include 'loop.gin'\nTrainConfig.steps = 1\n")
    fails(["train", "--gin_file", "loop.gin"], "loop.gin: its includes go round in a circle", capsys)


def test_gin_file_syntax_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.gin").write_text("include 'tiny.gin'\nTrainConfig.steps = (1,\n")
    fails(["train", "--gin_file", "bad.gin"], "gin syntax error in", capsys)


# ---- one trained run (tiny.gin, 4 steps, checkpoints at 2 and 4), copied per case ----
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root, here = tmp_path_factory.mktemp("trained"), os.getcwd()
    os.chdir(root)
    try:
        assert cli.main(["train", *TINY, *STEPS, "--workdir", "w"]) == 0
    finally:
        os.chdir(here)
    return root / "w"


STEPS = ["--gin_param", "TrainConfig.steps = 4", "--gin_param", "TrainConfig.checkpoint_every = 2"]


@pytest.fixture()
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


def train_again(run, *bindings):
    return ["train", *TINY, *STEPS, *sum((["--gin_param", b] for b in bindings), []),
            "--workdir", str(run)]


@pytest.mark.parametrize("binding,culprit", [
    ("TrainConfig.steps = 2", "TrainConfig.steps=2, but"),
    ("LLMConfig.hidden = 128", "llm.hidden: saved 256, now 128"),
    ("LLMConfig.num_layers = 3", "llm.num_layers: saved 4, now 3"),
    ("TrainConfig.trainable = ('llm',)", "TrainConfig.trainable: saved ['.*'], now ['llm']"),
    ("ModelConfig.param_dtype = 'bfloat16'", "float32, now ("),
])
def test_resume_that_does_not_fit_names_the_change(run, capsys, binding, culprit):
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    fails(train_again(run, binding), culprit, capsys)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    """A checkpoint's data-iterator position belongs to the file it was read from."""
    from data_helpers import word_level_tokenizer

    word_level_tokenizer(tmp_path / "tok")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = {"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour ?"}, {"from": "gpt", "value": "Red"}]}
    for name, n in (("one.json", 6), ("two.json", 7)):
        (tmp_path / name).write_text(json.dumps([record] * n))
    data = ["--gin_param", f"DataConfig.image_root = '{tmp_path}'", "--gin_param",
            f"DataConfig.tokenizer_dir = '{tmp_path / 'tok'}'", "--gin_param", "LLMConfig.vocab_size = 64"]
    first = ["train", *TINY, *data, "--gin_param", "TrainConfig.steps = 1", "--workdir", str(tmp_path / "w")]
    assert cli.main([*first, "--gin_param", f"DataConfig.data_path = '{tmp_path / 'one.json'}'"]) == 0
    capsys.readouterr()
    fails([*first[:-2], "--gin_param", "TrainConfig.steps = 2", "--gin_param",
           f"DataConfig.data_path = '{tmp_path / 'two.json'}'", "--workdir", str(tmp_path / "w")],
          f"DataConfig.data_path: saved '{tmp_path / 'one.json'}', now '{tmp_path / 'two.json'}'",
          capsys)


def test_a_second_trainer_on_one_workdir_is_refused(run, capsys):
    from mqt_jax.training.loop import WorkdirLock

    held = WorkdirLock(run)  # as a running trainer holds it
    try:
        fails(train_again(run, "TrainConfig.steps = 6"), "is in use by another trainer", capsys)
    finally:
        held.release()
    assert (run / "metrics.jsonl").read_text().count("\n") == 4  # not truncated


def test_data_iterator_state_that_disagrees_with_the_step_is_refused(run, capsys):
    meta = run / "checkpoints" / "4" / "data" / "metadata"
    saved = json.loads(meta.read_text())
    saved["iterator"]["step"] = 3
    meta.write_text(json.dumps(saved))
    fails(train_again(run, "TrainConfig.steps = 6"), "data-iterator state is at batch 3, not 4",
          capsys)


def flip_a_byte(step_dir: Path) -> None:
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


DAMAGE = {
    "truncated array file": lambda d: [p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
                                       for p in (d / "state").rglob("*") if p.is_file() and "/d/" in str(p)],
    "emptied step folder": lambda d: [shutil.rmtree(d), d.mkdir()],
    "deleted manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "deleted metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "garbage data item": lambda d: (d / "data" / "metadata").write_text("{not json"),
    "flipped bytes": flip_a_byte,
    "flipped bytes, fingerprint removed": lambda d: [flip_a_byte(d), (d / "data" / "metadata").write_text(
        json.dumps({k: v for k, v in json.loads((d / "data" / "metadata").read_text()).items()
                    if k != "fingerprint"}))],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run, capsys, damage):
    DAMAGE[damage](run / "checkpoints" / "4")
    assert cli.main(train_again(run)) == 0
    out = capsys.readouterr()
    assert "checkpoint: step 4 in" in out.out and "is damaged" in out.out, out.out
    assert "resumed from step 2" in out.out and "Traceback" not in out.err
    assert (run / "checkpoints" / "4.damaged").is_dir()  # kept aside for a look
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 trained again, logged once


def test_when_no_checkpoint_restores_none_is_moved(run, capsys):
    """Every step failing at once is likelier this run's change than damage: keep them all."""
    for step in ("2", "4"):
        DAMAGE["flipped bytes"](run / "checkpoints" / step)
    metrics = (run / "metrics.jsonl").read_text()
    fails(train_again(run), "restores (nothing moved", capsys)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert (run / "metrics.jsonl").read_text() == metrics


def test_resume_keeps_metrics_up_to_the_checkpoint(run, capsys):
    shutil.rmtree(run / "checkpoints" / "4")  # as if killed after step 4 was logged, unsaved
    assert cli.main(train_again(run, "TrainConfig.steps = 5")) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_config_gin_paths_are_absolute(tmp_path, monkeypatch):
    from mqt_jax.training.loop import absolute_paths

    monkeypatch.chdir(tmp_path)
    text = ("stage2/DataConfig.data_path = 'data/x.json'\nEvalConfig.questions = \"q.jsonl\"\n"
            "DataConfig.template = 'plain'\nEvalConfig.answers = '/abs/a.jsonl'\n")
    assert absolute_paths(text) == (f"stage2/DataConfig.data_path = '{tmp_path}/data/x.json'\n"
                                    f"EvalConfig.questions = \"{tmp_path}/q.jsonl\"\n"
                                    "DataConfig.template = 'plain'\nEvalConfig.answers = '/abs/a.jsonl'\n")


def test_training_data_that_gives_no_example_stops_with_counts(tmp_path, monkeypatch, capsys):
    from data_helpers import word_level_tokenizer

    monkeypatch.chdir(tmp_path)
    word_level_tokenizer(tmp_path / "tok")
    record = {"id": "r", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour ?"}, {"from": "gpt", "value": "Red"}]}
    (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record] * 3).encode())
    (tmp_path / "wrong_root").mkdir()  # the images are not in it
    fails(["train", *TINY, "--gin_param", "DataConfig.data_path = 'data.json'",
           "--gin_param", "DataConfig.image_root = 'wrong_root'",
           "--gin_param", "DataConfig.tokenizer_dir = 'tok'", "--gin_param", "LLMConfig.vocab_size = 64",
           "--workdir", "w"], "gives a training example (3 records on this host", capsys)


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.Popen([sys.executable, "-m", "mqt_jax.cli", "train", *TINY, *STEPS,
                             "--workdir", "w"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "w" / ".lock").exists() and time.time() < deadline:  # train() began
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in out and "Traceback" not in err


# ---- generate / eval ----
def image_file(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content.save(path)
    return str(path)


@pytest.mark.parametrize("name,content,culprit", [
    ("empty.png", b"", "empty.png: empty (0 bytes)"),
    ("garbage.png", b"\x89PNG not really", "garbage.png: not a decodable image"),
    ("bomb.png", Image.new("1", (20000, 20000)), "bomb.png: over the limit"),
])
def test_generate_refuses_a_bad_image(tmp_path, capsys, name, content, culprit):
    image = image_file(tmp_path, name, content)
    fails(["generate", "--workdir", str(tmp_path), "--image", image, "--prompt", "hi", "--m", "4"],
          culprit, capsys)


@pytest.mark.parametrize("m", ["", ",", "four", "2,x"])
def test_generate_refuses_a_bad_m(tmp_path, capsys, m):
    image = image_file(tmp_path, "ok.png", Image.new("RGB", (8, 8)))
    fails(["generate", "--workdir", str(tmp_path), "--image", image, "--prompt", "hi", "--m", m],
          f"--m {m!r}: expected integers", capsys)


def test_generate_names_an_m_beyond_the_model(run, tmp_path, capsys):
    image = image_file(tmp_path, "ok.png", Image.new("RGB", (8, 8)))
    fails(["generate", "--workdir", str(run), "--image", image, "--prompt", "hi", "--m",
           "99999999999999999999"], "m=[99999999999999999999] outside [1, 64]", capsys)


@pytest.mark.parametrize("argv", [["eval", "--limit", "-3"], ["eval", "--limit", "0"],
                                  ["generate", "--image", "x", "--prompt", "p", "--m", "1",
                                   "--max_new_tokens", "0"]])
def test_counts_below_one_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "is not an integer >= 1" in capsys.readouterr().err


def test_eval_out_under_a_file_fails_before_anything_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    fails(["eval", "--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "file" / "out")],
          "file/out", capsys)


def questions_file(tmp_path, rows):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_duplicate_question_ids_are_refused(tmp_path):
    from helpers import tiny_config

    from mqt_jax.config import EvalConfig
    from mqt_jax.evaluation.evaluate import evaluate

    rows = [{"question_id": i, "image": "a.png", "text": "?"} for i in (1, 2, 1)]
    config = EvalConfig(benchmark="llava_bench", questions=questions_file(tmp_path, rows))
    with pytest.raises(ValueError, match=r"1 question id\(s\) appear more than once .*\['1'\]"):
        evaluate(tiny_config(), None, config, None)


@pytest.mark.parametrize("image,culprit", [("../secret.png", "not a path inside the image root"),
                                           ("/etc/hostname", "not a path inside the image root"),
                                           (7, "'image' is 7, not a path")])
def test_question_images_stay_under_the_image_root(tmp_path, image, culprit):
    from mqt_jax.evaluation.benchmarks import Question
    from mqt_jax.evaluation.evaluate import load_images

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    with pytest.raises(ValueError, match=culprit):
        load_images([Question("q1", "?", image)], str(tmp_path / "images"), 8, "pad")


def test_a_prompt_longer_than_the_model_takes_is_refused_before_compiling():
    import dataclasses

    from helpers import init_params, random_batch, tiny_config

    from mqt_jax.config import SamplingConfig
    from mqt_jax.core import sharding, splice
    from mqt_jax.inference.generate import Generator
    from mqt_jax.models.vlm import VisionLanguageModel

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_length=64))
    mesh = sharding.make_mesh(MeshConfig())
    params = init_params(VisionLanguageModel(cfg), random_batch(cfg, [4] * 8), method="logits")
    generator = Generator(cfg, params, mesh, eos_id=2, sampling=SamplingConfig(max_new_tokens=8),
                          batch_size=8)
    prompt = splice.Example([1, splice.IMAGE_TOKEN] + [5] * 50, [splice.IGNORE] * 52)
    with pytest.raises(ValueError, match=r"prompt 0 is 67 tokens at m=16; with max_new_tokens=8 "
                                         r"the model takes at most 56"):
        generator([prompt], np.zeros((1, 32, 32, 3), np.float32), 16)


# ---- convert ----
def llama(tmp_path):
    from test_convert import llama_folder

    return llama_folder(tmp_path / "src")


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def first_two(header):
    return [k for k in header if k != "__metadata__"][:2]


def overlap(header):
    a, b = first_two(header)
    begin, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + end - begin]
    return header


HEADERS = {
    "a list": lambda h: [h],
    "no data_offsets": lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"}
                                      if k == first_two(h)[0] else v) for k, v in h.items()},
    "negative offsets": lambda h: {**h, first_two(h)[0]: {**h[first_two(h)[0]], "data_offsets": [-8, 0]}},
    "overlapping offsets": overlap,
}


@pytest.mark.parametrize("case", HEADERS)
def test_convert_validates_safetensors_headers(tmp_path, capsys, case):
    src = llama(tmp_path)
    rewrite_header(src / "model.safetensors", HEADERS[case])
    fails(["convert", "--kind", "llama", "--src", str(src), "--out", str(tmp_path / "out")],
          "model.safetensors: not a valid safetensors file", capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight_map,culprit", [
    ([1, 2], "weight_map is not a mapping"),
    ({"model.norm.weight": 5}, "weight_map is not a mapping"),
    ({"model.norm.weight": "../elsewhere.safetensors"}, "names shard(s) outside"),
    ({"model.norm.weight": "/etc/passwd"}, "names shard(s) outside"),
    ({"model.norm.weight": "link.safetensors"}, "names shard(s) outside"),
])
def test_convert_confines_the_shard_index(tmp_path, capsys, weight_map, culprit):
    src = llama(tmp_path)
    shutil.copy(src / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (src / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails(["convert", "--kind", "llama", "--src", str(src), "--out", str(tmp_path / "out")],
          culprit, capsys)


@pytest.mark.parametrize("edit,culprit", [
    (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "vocab_size missing"),
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, "num_hidden_layers missing"),
    (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads missing or not a positive"),
    (lambda c: [c], "config.json is a JSON list, not an object"),
])
def test_convert_checks_config_json(tmp_path, capsys, edit, culprit):
    src = llama(tmp_path)
    (src / "config.json").write_text(json.dumps(edit(json.loads((src / "config.json").read_text()))))
    fails(["convert", "--kind", "llama", "--src", str(src), "--out", str(tmp_path / "out")],
          culprit, capsys)


def test_convert_refuses_a_bogus_dtype(tmp_path, capsys):
    fails(["convert", "--kind", "llama", "--src", str(llama(tmp_path)), "--out",
           str(tmp_path / "out"), "--param_dtype", "bogus"], "--param_dtype 'bogus'", capsys)


def test_convert_clears_what_a_killed_conversion_left(tmp_path, capsys):
    stale = tmp_path / ".out.partial-abc123"
    (stale / "checkpoints").mkdir(parents=True)
    assert cli.main(["convert", "--kind", "llama", "--src", str(llama(tmp_path)),
                     "--out", str(tmp_path / "out")]) == 0
    assert not stale.exists() and (tmp_path / "out" / "checkpoints").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
