import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from helpers import random_batch, tiny_config

from mqt_jax.config import MeshConfig, MSampler, TrainConfig
from mqt_jax.core import sharding
from mqt_jax.core.sharding import make_mesh
from mqt_jax.training.synthetic import synthetic_batch
from mqt_jax.training.trainer import (
    CompileCounter,
    Trainer,
    make_optimizer,
    merge_params,
    split_params,
)


def trainer_for(mesh_shape=(1, 4, 2), variant="official", **train_kw):
    kw = dict(batch_size=8, seq_len=40, steps=20, learning_rate=3e-3)
    return Trainer(tiny_config(variant), TrainConfig(**{**kw, **train_kw}),
                   make_mesh(MeshConfig(*mesh_shape)))


def test_train_step_compiles_once_while_m_changes_every_step():
    trainer = trainer_for(variant="qformer", trainable=(".*",))
    state = trainer.init_state()
    cfg = trainer.model_config
    m_per_step = [[16] * 8, [1] * 8, [2, 4, 8, 16, 1, 3, 5, 7], [9] * 8, [16, 1] * 4]
    with CompileCounter() as compiles:
        for step, m in enumerate(m_per_step):
            state, metrics = trainer.step(state, random_batch(cfg, m, seq_len=40, seed=step))
            assert np.isfinite(float(metrics["loss"]))
    assert compiles.counts["jit(_train_step)"] == 1, compiles.counts


def test_frozen_parameters_have_no_optimizer_state_and_do_not_move():
    trainer = trainer_for(trainable=("query_transformer",))  # the paper's stage 1
    state = trainer.init_state()
    trainable, frozen = flatten_dict(state.trainable), flatten_dict(state.frozen)
    assert all(k[0] == "query_transformer" for k in trainable)
    assert {k[0] for k in frozen} == {"vision_tower", "llm", "query_transformer"}
    assert ("query_transformer", "pos_embed") in frozen  # fixed sin-cos, never trained
    trainable_size = sum(x.size for x in trainable.values())
    opt_leaves = jax.tree.leaves(state.opt_state)
    # Adam's mu and nu, shaped like the trainable parameters; the rest are step counters.
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * trainable_size
    assert all(x.size == 1 for x in opt_leaves if not x.ndim)
    before_frozen = jax.device_get(state.frozen)
    before_trainable = jax.device_get(state.trainable)
    for step in range(2):
        state, _ = trainer.step(state, random_batch(trainer.model_config, [4] * 8, 40, seed=step))
    for a, b in zip(jax.tree.leaves(before_frozen), jax.tree.leaves(jax.device_get(state.frozen))):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before_trainable), jax.tree.leaves(jax.device_get(state.trainable)))]
    assert all(moved)


def test_split_params_by_patterns():
    params = {"vision_tower": {"w": 1}, "query_transformer": {"query": 2, "pos_embed": 3},
              "llm": {"w": 4}}
    stage2 = TrainConfig(trainable=("query_transformer", "llm"))
    trainable, frozen = split_params(params, stage2)
    assert trainable == {"query_transformer": {"query": 2}, "llm": {"w": 4}}
    assert frozen == {"vision_tower": {"w": 1}, "query_transformer": {"pos_embed": 3}}


def test_schedule_is_warmup_then_cosine():
    _, schedule = make_optimizer(TrainConfig(steps=100, warmup_fraction=0.1, learning_rate=2.0))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(1.0)  # halfway through warmup
    assert float(schedule(10)) == pytest.approx(2.0)
    assert float(schedule(55)) == pytest.approx(1.0, abs=1e-5)  # cosine midpoint
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_clipping_and_reported_norm():
    trainer = trainer_for(trainable=(".*",), grad_clip=1e-3)
    state = trainer.init_state()
    state, metrics = trainer.step(state, random_batch(trainer.model_config, [8] * 8, 40))
    assert float(metrics["grad_norm"]) > 0.1  # reported before clipping, far above the clip
    # After one step Adam's first moment is exactly (1 - b1) * the clipped gradient.
    mu = state.opt_state[1][0].mu
    assert float(optax.tree.norm(mu)) == pytest.approx((1 - 0.9) * 1e-3, rel=1e-4)


def test_bad_batches_fail_before_compiling():
    trainer = trainer_for()
    state = trainer.init_state()
    cfg = trainer.model_config
    bad_m = random_batch(cfg, [4] * 8, 40)
    bad_m["m"] = bad_m["m"] * 0
    wrong_size = random_batch(cfg, [4] * 8, 40)
    wrong_size["images"] = np.zeros((8, 1, 24, 24, 3), np.float32)
    with CompileCounter() as compiles:
        with pytest.raises(ValueError, match=r"m=\[0\] outside \[1, 16\]"):
            trainer.step(state, bad_m)
        with pytest.raises(ValueError, match=r"images of shape \(8, 1, 24, 24, 3\)"):
            trainer.step(state, wrong_size)
        with pytest.raises(ValueError, match=r"\[batch_size=8, seq_len=40\]"):
            trainer.step(state, random_batch(cfg, [4] * 8, 32))
    assert "jit(_train_step)" not in compiles.counts


def test_batch_must_divide_over_data_parallel_devices():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible .* = 4 devices"):
        trainer_for(mesh_shape=(2, 2, 2), batch_size=6)


def test_bf16_compute_keeps_float32_master_weights():
    mesh = make_mesh(MeshConfig(1, 8, 1))
    train = TrainConfig(batch_size=8, seq_len=40, trainable=(".*",))
    f32 = Trainer(tiny_config(), train, mesh)
    bf16 = Trainer(tiny_config(dtype="bfloat16"), train, mesh)
    batch = random_batch(f32.model_config, [8] * 8, 40)
    s32, s16 = f32.init_state(), bf16.init_state()
    assert {x.dtype for x in jax.tree.leaves(s16.trainable)} == {np.dtype("float32")}
    _, m32 = f32.step(s32, batch)
    s16, m16 = bf16.step(s16, batch)
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # bf16 really is used
    assert {x.dtype for x in jax.tree.leaves(s16.opt_state)} <= {np.dtype("float32"), np.dtype("int32")}


def test_gradient_accumulation_equals_one_pass():
    batch = None
    results = []
    for steps in (1, 2):  # batch 8 over 4 data-parallel devices: at most 2 micro-batches
        trainer = trainer_for(mesh_shape=(1, 4, 2), trainable=(".*",), grad_accum_steps=steps)
        state = trainer.init_state()
        if batch is None:
            m = np.random.default_rng(0).integers(1, 17, size=8)
            batch = random_batch(trainer.model_config, m, 40)
        device_batch = trainer.shard_batch(batch)
        with sharding.activate(trainer.mesh):
            loss, count, row_nll, grads = jax.jit(trainer._loss_and_grads)(state, device_batch)
        results.append((float(loss), float(count), np.asarray(row_nll), jax.device_get(grads)))
    (loss1, count1, rows1, grads1) = results[0]
    assert count1 == batch["loss_mask"].sum()
    for loss, count, rows, grads in results[1:]:
        assert loss == pytest.approx(loss1, rel=1e-6) and count == count1
        np.testing.assert_allclose(rows, rows1, rtol=1e-5)  # row order restored
        # Summing in another order moves float32 by ~eps times the largest gradient, so the
        # absolute slack follows the whole tree's scale: leaves whose true gradient is zero
        # (attention key biases: softmax ignores a shift) hold only that rounding noise.
        # Measured: largest difference 5e-7 x the largest gradient; a lost micro-batch moves
        # every leaf with a real gradient by ~50%.
        scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(grads1))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_accumulation_must_divide_the_batch():
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by grad_accum_steps=3"):
        trainer_for(grad_accum_steps=3)
    with pytest.raises(ValueError, match="grad_accum_steps=4 x the mesh's data x fsdp = 4"):
        trainer_for(grad_accum_steps=4)


def test_m_ranges_and_loss_by_m_by_hand():
    from mqt_jax.training.metrics import loss_by_m, m_ranges

    assert m_ranges(64) == [(0, 4), (4, 16), (16, 64)]
    assert m_ranges(256)[-1] == (64, 256) and m_ranges(2) == [(0, 2)]
    batch = {"loss_mask": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], np.float32),
             "visual_index": np.array([[0, -1, -1], [0, -1, -1], [0, -1, -1], [-1, -1, -1]]),
             "m": np.array([[2], [3], [40], [50]])}
    row_nll = np.array([2.0, 4.0, 9.0, 100.0])  # the last row has no image: left out
    assert loss_by_m(row_nll, batch, 64) == {"loss_m/1-4": (2.0 + 4.0) / 3, "loss_m/17-64": 3.0}


def test_all_scales_loss_is_the_mean_of_each_scales_loss():
    """MSampler "all" (M3's rule) on the m3 compressor: the batch's token-mean loss equals the
    mean over scales of the loss of the same examples at one scale; the step trains on it."""
    trainer = trainer_for(variant="m3", trainable=(".*",))
    sampler = MSampler("all", values=(1, 4, 16))
    batch = synthetic_batch(trainer.model_config, sampler, batch_size=8, seq_len=40, step=3)
    np.testing.assert_array_equal(batch["m"][:6, 0], [1, 4, 16] * 2)  # 2 examples x 3 scales
    assert batch["segment_ids"][6:].max() == 0  # the rows left over are empty
    state = trainer.init_state()
    params = merge_params(*jax.device_get((state.trainable, state.frozen)))
    whole = float(trainer.loss(params, batch)[0])
    per_scale = [float(trainer.loss(params, {k: v[i:6:3] for k, v in batch.items()})[0])
                 for i in range(3)]
    assert len(set(np.round(per_scale, 5))) == 3  # the scales see different tokens
    assert whole == pytest.approx(np.mean(per_scale), rel=1e-5)
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["loss"]) == pytest.approx(whole, rel=1e-4)
