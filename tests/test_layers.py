import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import rope_hf

from mqt_jax.models import layers


def test_dense_contracts_several_axes_like_einsum():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    d = layers.dense(7, ("heads", "head_dim", "embed"), num_in=2, use_bias=True)
    params = d.init(jax.random.key(0), x)["params"]
    kernel, bias = (np.asarray(jax.tree.leaves(params["kernel"])[0]),
                    np.asarray(jax.tree.leaves(params["bias"])[0]))
    assert kernel.shape == (4, 5, 7)
    np.testing.assert_allclose(d.apply({"params": params}, x),
                               np.einsum("abij,ijk->abk", x, kernel) + bias, rtol=1e-5, atol=1e-6)


def test_rope_matches_hugging_face_formula_and_is_relative():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 30]])
    np.testing.assert_allclose(layers.rope(x, pos, 500.0), rope_hf(x.astype(np.float64), pos, 500.0),
                               rtol=1e-5, atol=1e-5)
    # <rope(q, a), rope(k, b)> depends on a - b only.
    q, k = x[:, :1], x[:, 1:2]
    dot = lambda a, b: float(jnp.sum(layers.rope(q, np.array([[a]]), 500.0)  # noqa: E731
                                     * layers.rope(k, np.array([[b]]), 500.0)))
    assert dot(9, 4) == pytest.approx(dot(25, 20), rel=1e-4)
    assert dot(9, 4) != pytest.approx(dot(9, 5), rel=1e-3)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "everything_saveable"])
def test_remat_policies_change_memory_not_values(policy):
    from mqt_jax.config import VisionConfig
    from mqt_jax.models.vision_tower import VisionTower

    cfg = VisionConfig(image_size=16, patch_size=8, width=16, num_layers=3, num_heads=2, mlp_dim=32)
    images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    base = VisionTower(cfg, remat_policy="none")
    params = base.init(jax.random.key(0), images)

    def loss(p, module):
        return jnp.sum(module.apply(p, images) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref = grad(params, base)
    g = grad(params, VisionTower(cfg, remat_policy=policy))
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("span", [1, 5, 24])
def test_attend_span_equals_attend_over_the_slots_each_row_sees(span):
    """One query per row over a heads-first whole-stack cache, read chunk by chunk up to
    `span`: the same as plain attention masked to slots <= the row's index."""
    from mqt_jax.models.layers import attend, attend_span

    rng = np.random.default_rng(span)
    layers_, b, kv, heads, slots, d = 2, 3, 2, 6, 24, 8
    k_all = rng.normal(size=(layers_, b, kv, slots, d)).astype(np.float32)
    v_all = rng.normal(size=(layers_, b, kv, slots, d)).astype(np.float32)
    q = rng.normal(size=(b, 1, heads, d)).astype(np.float32)
    index = np.minimum(np.array([[0, span - 1, span // 2]] * layers_), slots - 1)
    cache = {"k": k_all, "v": v_all, "index": index, "layer": 1, "span": span}
    got = attend_span(jnp.asarray(q), cache, chunk=8)
    mask = (np.arange(slots)[None, :] <= index[1][:, None])[:, None, None, :]
    want = attend(q, np.swapaxes(k_all[1], 1, 2), np.swapaxes(v_all[1], 1, 2), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
