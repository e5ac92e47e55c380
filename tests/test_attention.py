"""The attention kernels (mqt_jax/models/attention.py) against a float64 numpy reference and
each other: splash runs here in Pallas interpret mode; cuDNN needs an NVIDIA GPU
(scripts/gpu_check.py runs its comparison there)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init_params, random_batch, tiny_config
from numpy_reference import attention_core

from mqt_jax.config import MeshConfig
from mqt_jax.core import sharding
from mqt_jax.core.sharding import make_mesh
from mqt_jax.models.attention import CausalSegments, attend
from mqt_jax.models.vlm import VisionLanguageModel


def packed(seed=0, batch=2, length=100, heads=4, kv_heads=2, dim=16):
    """q, k, v and segment ids of rows holding several examples, then padding (id 0)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, length, kv_heads, dim)).astype(np.float32) for _ in range(2))
    segments = np.zeros((batch, length), np.int32)
    segments[0, :20], segments[0, 20:50], segments[0, 50:90] = 1, 2, 3
    segments[1, :] = 1
    return q, k, v, segments


def test_attend_groups_kv_heads_like_repeat_kv():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    mask = rng.random((2, 1, 4, 5)) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    np.testing.assert_allclose(attend(q, k, v, mask), attention_core(q.astype(np.float64), k, v, mask),
                               rtol=1e-5, atol=1e-5)


def test_causal_segments_is_causal_within_each_segment():
    segments = np.array([[1, 1, 2, 2, 0]])
    dense = np.asarray(CausalSegments(segments, np.pad(segments, ((0, 0), (0, 2)))).dense())
    assert dense.shape == (1, 1, 5, 7)
    want = np.zeros((5, 7), bool)
    want[0, 0] = want[1, :2] = want[2, 2] = want[3, 2:4] = True
    want[4, 4:5] = True  # padding sees earlier padding (its outputs carry no loss)
    np.testing.assert_array_equal(dense[0, 0], want)


@pytest.mark.parametrize("cache_slots", [0, 28])
def test_splash_equals_the_reference_forward_and_backward(cache_slots):
    """Lengths that are not whole 128-blocks (padded inside), GQA, packed segments; with
    cache slots past the queries (prefill), too."""
    q, k, v, segments = packed()
    if cache_slots:
        k, v = (np.pad(x, ((0, 0), (0, cache_slots), (0, 0), (0, 0))) for x in (k, v))
    mask = CausalSegments(segments, np.pad(segments, ((0, 0), (0, cache_slots))))
    valid = (segments > 0)[..., None, None]
    want = attention_core(q.astype(np.float64), k, v, np.asarray(mask.dense()))
    got = np.asarray(attend(q, k, v, mask, "splash"))
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), rtol=1e-5, atol=1e-5)

    def grads(implementation):
        loss = lambda *qkv: (attend(*qkv, mask, implementation) * valid).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for name, a, b in zip("qkv", grads("splash"), grads("xla")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_splash_in_the_model_on_a_mesh_equals_xla():
    """The LLM's training attention through splash, shard_map'd over a 2 x 2 x 2 mesh (batch
    over data x fsdp, heads over tensor): the loss's value and gradients equal xla's."""
    cfg = tiny_config()
    batch = random_batch(cfg, [16, 4, 1, 9, 2, 16, 3, 8], seq_len=40)
    params = init_params(VisionLanguageModel(cfg), batch, method="logits")
    mesh = make_mesh(MeshConfig(2, 2, 2))

    def loss_and_grads(attention):
        model = VisionLanguageModel(dataclasses.replace(cfg, attention=attention))

        def loss(p):
            logits = model.apply({"params": p}, batch, method="logits")
            return (jax.nn.log_softmax(logits)[..., 0] * batch["loss_mask"]).sum()

        with sharding.activate(mesh):
            return jax.jit(jax.value_and_grad(loss))(params)

    (want, want_grads), (got, got_grads) = loss_and_grads("xla"), loss_and_grads("splash")
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="ModelConfig.attention='flash'"):
        dataclasses.replace(tiny_config(), attention="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for machines without one")
def test_cudnn_without_a_gpu_is_a_clear_error():
    q, k, v, segments = packed(length=16)
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
        attend(q, k, v, CausalSegments(segments, segments), "cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_equals_xla_on_a_packed_batch():
    q, k, v, segments = (jnp.asarray(x) for x in packed(length=128))
    mask = CausalSegments(segments, segments)
    valid = (segments > 0)[..., None, None]
    a = attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, "cudnn")
    b = attend(q, k, v, mask, "xla")
    np.testing.assert_allclose(np.where(valid, np.asarray(a, np.float32), 0),
                               np.where(valid, b, 0), atol=2e-2)


def test_gpu_check_script_runs_its_cpu_parts():
    """scripts/gpu_check.py (a script): its attention table with splash (interpreted) in
    place of cuDNN, and its train-step row on the tiny shapes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    table = gpu_check.attention_check(["splash"], rows=2, length=128, heads=4, kv_heads=2, dim=16)
    assert [row[1] for row in table] == ["output", "dq", "dk", "dv"]
    assert all(float(row[3]) < 2e-2 for row in table), table  # bfloat16 inputs
    row = gpu_check.step_check("xla", smoke=True, batch=2, seq=64, steps=1)
    assert row[0] == "xla" and row[2] == "2 x 64" and float(row[3]) > 0
