import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import random_batch, tiny_config
from jax.sharding import PartitionSpec as P

from mqt_jax.config import MeshConfig, TrainConfig
from mqt_jax.core import sharding
from mqt_jax.core.sharding import LOGICAL_AXIS_RULES, make_mesh
from mqt_jax.training.trainer import Trainer, merge_params

TRAIN = TrainConfig(batch_size=8, seq_len=40, trainable=(".*",), learning_rate=3e-3, steps=10)


def test_mesh_shape_resolution_and_errors():
    assert MeshConfig(2, -1, 2).shape(8) == (2, 2, 2)
    assert MeshConfig().shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        MeshConfig(3, -1, 1).shape(8)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        MeshConfig(2, 2, 1).shape(8)
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(-1, -1, 1).shape(8)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def expected_spec(names):
    """Apply the rules table by hand: first rule per logical name, mesh axes used once."""
    rules, used, spec = dict(LOGICAL_AXIS_RULES), set(), []
    for name in names:
        axis = rules.get(name)
        axes = () if axis is None else (axis,) if isinstance(axis, str) else axis
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    trainer = Trainer(tiny_config(), TRAIN, mesh)
    with sharding.activate(mesh):
        boxed = flatten_dict(jax.eval_shape(trainer.init_params, jax.random.key(0)))
    state = trainer.init_state()
    params = {**flatten_dict(state.trainable), **flatten_dict(state.frozen)}
    mu = flatten_dict(state.opt_state[1][0].mu)  # chain(clip, adamw): adam's first moment
    assert set(params) == set(boxed) and len(mu) == len(params) - 1  # all but the sin-cos table
    for path, box in boxed.items():
        spec = expected_spec(box.names)
        assert params[path].sharding.spec == spec, path
        if path in mu:
            assert mu[path].sharding.spec == spec, path
    # Spot checks of real shard shapes on the (2, 2, 2) mesh.
    lm_head = params[("llm", "lm_head", "kernel")]  # [embed 48, vocab 64] -> (fsdp, tensor)
    assert lm_head.addressable_shards[0].data.shape == (24, 32)
    q = params[("llm", "layers", "attn", "query", "kernel")]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 24, 3, 8)


def test_init_writes_sharded_outputs_directly():
    mesh = make_mesh(MeshConfig(1, 4, 2))
    trainer = Trainer(tiny_config(), TRAIN, mesh)
    with sharding.activate(mesh):
        compiled = jax.jit(trainer._init_state, out_shardings=trainer.state_shardings).lower(
            jax.random.key(0)).compile()
        abstract = jax.eval_shape(trainer._init_state, jax.random.key(0))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    per_device = compiled.memory_analysis().output_size_in_bytes
    assert per_device < 0.3 * total  # no device holds the whole model


def run_steps(mesh, steps=3):
    cfg = tiny_config()
    trainer = Trainer(cfg, TRAIN, mesh)
    state = trainer.init_state()
    initial = jax.device_get(state.trainable)
    losses = []
    for step in range(steps):
        m = np.random.default_rng(step).integers(1, 17, size=8)
        state, metrics = trainer.step(state, random_batch(cfg, m, seq_len=40, seed=step))
        losses.append(float(metrics["loss"]))
    return losses, initial, jax.device_get(state.trainable)


@pytest.mark.slow
def test_three_steps_on_2x2x2_equal_one_device():
    one, initial, params_one = run_steps(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]))
    many, _, params_many = run_steps(make_mesh(MeshConfig(2, 2, 2)))
    np.testing.assert_allclose(many, one, rtol=2e-5)
    one, many, initial = (flatten_dict(t) for t in (params_one, params_many, initial))
    for path in one:
        name = "/".join(path)
        if name in ZERO_GRADIENT:
            continue
        # Adam divides by sqrt(v): where a gradient is tiny, float reordering across shards
        # moves an entry by a fraction of a step. Allow 1% of one step (lr) per entry.
        np.testing.assert_allclose(one[path], many[path], rtol=0, atol=0.01 * TRAIN.learning_rate,
                                   err_msg=name)
        assert np.abs(one[path] - initial[path]).max() > 1e-4, name  # real updates happened


# Key biases (and the official resampler's ln_k bias, which feeds the keys only) shift every
# attention logit of a query by the same amount; softmax ignores that, so their gradient is
# identically zero and Adam turns float noise into steps of arbitrary sign. Nothing to compare.
ZERO_GRADIENT = {
    "vision_tower/layers/attn/key/bias",
    "query_transformer/attn/key/bias",
    "query_transformer/ln_k/bias",
}


def test_zero_gradient_parameters_really_have_zero_gradient():
    cfg = tiny_config()
    trainer = Trainer(cfg, TRAIN, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]))
    state = trainer.init_state()
    batch = trainer.shard_batch(random_batch(cfg, [5] * 8, seq_len=40))
    loss = lambda p: trainer.loss(merge_params(p, state.frozen), batch)[0]  # noqa: E731
    grads = flatten_dict(jax.jit(jax.grad(loss))(state.trainable))
    for path, g in grads.items():
        name, norm = "/".join(path), float(np.abs(g).max())
        if name in ZERO_GRADIENT:
            assert norm < 1e-6, (name, norm)
        elif name != "query_transformer/ln_k/scale":  # scales the keys: a real gradient
            assert norm > 1e-6, (name, norm)


def test_multislice_data_axis_crosses_slices_only():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FakeSliceDevice:  # a device of a multislice job, without TPU torus coordinates
        id: int
        slice_index: int
        platform: str = "cpu"  # so mesh_utils lays out each slice by plain reshape
        device_kind: str = "cpu"
        process_index: int = 0

    devices = [FakeSliceDevice(i, i // 4) for i in range(8)]
    grid = sharding.multislice_grid(MeshConfig(2, -1, 1, slices=2), (2, 4, 1), devices)
    assert grid.shape == (2, 4, 1)
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match="data=1 is not a multiple of slices=2"):
        sharding.multislice_grid(MeshConfig(1, -1, 1, slices=2), (1, 8, 1), devices)
    with pytest.raises(ValueError, match="cpu devices carry no slice_index"):
        make_mesh(MeshConfig(2, -1, 1, slices=2))
