import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import random_batch, tiny_config

from mqt_jax.config import MeshConfig, StageConfig, TrainConfig
from mqt_jax.core.checkpoint import Checkpointer, abstract_like, restore_params
from mqt_jax.core.sharding import make_mesh
from mqt_jax.training.trainer import Trainer

STEPS, EVERY = 40, 5
# These runs execute many steps, so default XLA optimisation (not the suite's fast-compile flag).
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONUNBUFFERED": "1"}
ARGS = ["--gin_file", "tiny.gin", "--gin_param", f"TrainConfig.steps = {STEPS}",
        "--gin_param", f"TrainConfig.checkpoint_every = {EVERY}",
        "--gin_param", "TrainConfig.seq_len = 80"]


def start(workdir):
    return subprocess.Popen([sys.executable, "-m", "mqt_jax.cli", "train", "--workdir", str(workdir),
                             *ARGS], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(workdir):
    out = subprocess.run([sys.executable, "-m", "mqt_jax.cli", "train", "--workdir", str(workdir),
                          *ARGS], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def wait_for_checkpoint(workdir, step, proc, timeout=300):
    target = workdir / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not target.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)


def saved_state(step_dir):
    """A saved state as numpy arrays, whatever mesh wrote it."""
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(step_dir / "state").item_metadata.tree)
    return checkpointer.restore(step_dir / "state", restore_args=as_numpy)


def final_params(workdir):
    state = saved_state(workdir / "checkpoints" / str(STEPS))
    return jax.tree_util.tree_leaves_with_path(state["trainable"])


def assert_bit_identical(a, b):
    a, b = final_params(a), final_params(b)
    assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 30
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(workdir)
    return workdir


@pytest.mark.slow
def test_sigkill_then_restart_is_bit_identical(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, EVERY, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < STEPS  # really interrupted mid-run
    stdout = run(tmp_path)
    assert f"resumed from step {killed_at}" in stdout
    assert_bit_identical(uninterrupted, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, EVERY, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved step" in stdout
    saved = int(stdout.split("SIGTERM: saved step ")[1].split()[0])
    assert EVERY <= saved < STEPS and (tmp_path / "checkpoints" / str(saved)).exists()
    assert f"resumed from step {saved}" in run(tmp_path)
    assert_bit_identical(uninterrupted, tmp_path)


def trainer_on(devices, mesh=(1, -1, 1)):
    train = TrainConfig(batch_size=8, seq_len=40, trainable=(".*",), steps=10)
    return Trainer(tiny_config(), train, make_mesh(MeshConfig(*mesh), devices=devices))


def test_restore_onto_other_meshes_reshards(tmp_path):
    writer = trainer_on(jax.devices(), mesh=(2, 2, 2))
    state = writer.init_state()
    state, _ = writer.step(state, random_batch(writer.model_config, [4] * 8, 40))
    saved = jax.device_get(state)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"step": 1}, "config")
    ckpt.wait()
    for n in (1, 4):
        reader = trainer_on(jax.devices()[:n])
        restored, data = Checkpointer(tmp_path).restore(
            1, abstract_like(reader.abstract_state, reader.state_shardings))
        assert data == {"step": 1}
        for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                 jax.tree.leaves(reader.state_shardings)):
            assert got.sharding == sh and len(got.sharding.device_set) == n
            np.testing.assert_array_equal(np.asarray(got), want)


def test_half_written_checkpoint_is_never_the_latest(tmp_path, capsys):
    trainer = trainer_on(jax.devices())
    state = trainer.init_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, state, {"step": 5}, "config")
    ckpt.wait()
    ckpt.close()
    partial = tmp_path / "10.orbax-checkpoint-tmp-1234"  # what a save killed midway leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 100)
    again = Checkpointer(tmp_path)
    assert again.latest_step() == 5
    assert "ignoring half-written ['10.orbax-checkpoint-tmp-1234']" in capsys.readouterr().out


def test_non_finite_updates_are_skipped_and_counted():
    trainer = trainer_on(jax.devices())
    state = trainer.init_state()
    good = random_batch(trainer.model_config, [4] * 8, 40)
    bad = {**good, "images": np.full_like(good["images"], np.nan)}
    before = jax.device_get(state.trainable)
    state, metrics = trainer.step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped_updates) == 1 and int(state.nonfinite_in_a_row) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.trainable))):
        np.testing.assert_array_equal(a, b)
    state, _ = trainer.step(state, bad)
    assert int(state.nonfinite_in_a_row) == 2
    state, metrics = trainer.step(state, good)
    assert int(state.nonfinite_in_a_row) == 0 and int(state.skipped_updates) == 2
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("every,said", [(2, r"the last good checkpoint, step 4 in .* is intact"),
                                        (0, "no checkpoint was saved before")])
def test_run_stops_after_too_many_non_finite_updates(tmp_path, monkeypatch, every, said):
    import gin

    from mqt_jax import cli
    from mqt_jax.training import loop as train_module
    from mqt_jax.training import synthetic

    real = synthetic.synthetic_batch

    def poisoned(*args, step, **kw):  # finite for steps 0-2, NaN images after
        batch = real(*args, step=step, **kw)
        if step >= 3:
            batch["images"] = np.full_like(batch["images"], np.nan)
        return batch

    monkeypatch.setattr(synthetic, "synthetic_batch", poisoned)
    cli.parse_gin(["tiny.gin"], ["TrainConfig.steps = 20", f"TrainConfig.checkpoint_every = {every}",
                                 "TrainConfig.max_nonfinite_in_a_row = 2",
                                 "TrainConfig.seq_len = 80"])
    with pytest.raises(RuntimeError, match=f"2 non-finite updates in a row at step 5 .*; {said}"):
        train_module.train(str(tmp_path), StageConfig.read())
    gin.clear_config()
    if not every:
        return
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 4  # step 4 (NaN at step index 3) was skipped, state still good
    state = saved_state(tmp_path / "checkpoints" / "4")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["trainable"]))


def test_init_from_takes_the_matching_parameters_of_another_run(tmp_path):
    from flax.traverse_util import flatten_dict

    from mqt_jax.training.trainer import merge_params

    stage1 = trainer_on(jax.devices(), mesh=(2, 2, 2))
    saved = stage1.init_state(seed=1)
    ckpt = Checkpointer(tmp_path / "stage1" / "checkpoints")
    ckpt.save(7, saved, {"step": 7}, "config")
    ckpt.wait()
    ckpt.close()
    saved = flatten_dict(jax.device_get(merge_params(saved.trainable, saved.frozen)))
    # stage 2 on another mesh, another seed; only the query transformer is taken
    config = TrainConfig(batch_size=8, seq_len=40, trainable=("query_transformer", "llm"),
                         init_from_params=("query_transformer",))
    stage2 = Trainer(tiny_config(), config, make_mesh(MeshConfig(1, 4, 1), devices=jax.devices()[:4]))
    fresh = flatten_dict(jax.device_get(merge_params(*_parts(stage2.init_state(seed=2)))))
    state = stage2.init_state(seed=2, init_from=tmp_path / "stage1")
    got = flatten_dict(merge_params(*_parts(state)))
    assert set(got) == set(saved)
    for key, value in got.items():
        want = saved[key] if key[0] == "query_transformer" else fresh[key]
        np.testing.assert_array_equal(np.asarray(value), want, err_msg="/".join(key))
    kernels = [k for k in got if k[-1] == "kernel"]
    assert all(not np.array_equal(saved[k], fresh[k]) for k in kernels)  # the seeds differ
    assert state.trainable["query_transformer"]["proj"]["kernel"].sharding.mesh.shape["fsdp"] == 4


def test_init_from_several_runs_takes_each_ones_parts(tmp_path):
    """Stage 1's start: the vision tower of one run (a CLIP), the LLM of another (a language
    model), the query transformer fresh; a path is found from the working directory when it
    is no sibling of the workdir."""
    from flax.traverse_util import flatten_dict

    from mqt_jax.training.loop import init_sources
    from mqt_jax.training.trainer import merge_params

    saved = {}
    for name, seed in (("clip", 1), ("lm", 2)):
        state = trainer_on(jax.devices()[:1], mesh=(1, 1, 1)).init_state(seed=seed)
        ckpt = Checkpointer(tmp_path / "pretrained" / name / "checkpoints")
        ckpt.save(3, state, {"step": 3}, "config")
        ckpt.wait()
        ckpt.close()
        saved[name] = flatten_dict(jax.device_get(merge_params(*_parts(state))))
    config = TrainConfig(batch_size=8, seq_len=40, trainable=("query_transformer",), init_from={
        str(tmp_path / "pretrained/clip"): ("vision_tower",), "pretrained/lm": ("llm",)})
    stage1 = Trainer(tiny_config(), config, make_mesh(MeshConfig(1, 4, 1), devices=jax.devices()[:4]))
    fresh = flatten_dict(jax.device_get(merge_params(*_parts(stage1.init_state(seed=5)))))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sources = init_sources(config, Path("w/stage1"))
    finally:
        os.chdir(cwd)
    assert list(sources) == [tmp_path / "pretrained/clip/checkpoints",
                             tmp_path / "pretrained/lm/checkpoints"]
    got = flatten_dict(merge_params(*_parts(stage1.init_state(seed=5, init_from=sources))))
    for key, value in got.items():
        want = {"vision_tower": saved["clip"], "llm": saved["lm"]}.get(key[0], fresh)[key]
        np.testing.assert_array_equal(np.asarray(value), want, err_msg="/".join(key))
    with pytest.raises(FileNotFoundError, match="'pretrained/nope' does not exist"):
        init_sources(TrainConfig(init_from={"pretrained/nope": ("llm",)}), tmp_path / "w")
    with pytest.raises(ValueError, match=r"init_from\['x'\]"):
        TrainConfig(init_from={"x": "llm"})  # a string, not a tuple of regexes


def _parts(state):
    return state.trainable, state.frozen


def test_restore_params_names_a_mismatched_parameter(tmp_path):
    writer = trainer_on(jax.devices())
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, writer.init_state(), {}, "config")
    ckpt.wait()
    ckpt.close()
    other = Trainer(tiny_config(num_queries=9), TrainConfig(batch_size=8, seq_len=40),
                    make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match=r"query_transformer/\w+ has shape"):
        restore_params(tmp_path, other.abstract_params())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_params(tmp_path / "nothing", other.abstract_params())
