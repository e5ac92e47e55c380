import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import init_params, tiny_config
from numpy_reference import bicubic_resize_torch, official_resampler

from mqt_jax.compressors import build as QueryTransformer
from mqt_jax.compressors.avgpool import adaptive_pool_matrix
from mqt_jax.compressors.official import resize_grid_torch_bicubic, sincos_2d, torch_bicubic_matrix
from mqt_jax.config import QueryTransformerConfig


def make(cfg, batch=3, seed=0):
    qcfg = cfg.query
    module = QueryTransformer(qcfg, out_width=cfg.llm.hidden, grid_size=cfg.vision.grid_size)
    features = np.random.default_rng(seed).normal(
        size=(batch, cfg.vision.num_patches, cfg.vision.width)).astype(np.float32)
    m = np.full((batch,), qcfg.num_queries, np.int32)
    params = init_params(module, features, m, seed=seed)
    apply = jax.jit(lambda m, n: module.apply({"params": params}, features, m, n), static_argnums=1)
    run = lambda m, n=None: apply(jnp.asarray(m, jnp.int32), n)  # noqa: E731
    return module, params, features, run


def test_official_parameter_count_is_the_released_one():
    cfg = QueryTransformerConfig()  # M = 256, width 1024, 16 heads
    module = QueryTransformer(cfg, out_width=4096, grid_size=24)
    features = jax.ShapeDtypeStruct((1, 576, 1024), np.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), features, np.ones(1, np.int32))["params"]
    sizes = {"/".join(str(k.key) for k in path): x.size
             for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
    assert sum(sizes.values()) == 8_923_136
    assert sum(v for k, v in sizes.items() if k != "pos_embed") == 8_660_992


def test_sincos_table_hand_computed():
    # width 8: two frequencies w = (1, 10000^-1/2 = 0.01); first half encodes the column.
    table = sincos_2d(3, 8)
    row, col = 1, 2
    w = np.array([1.0, 0.01])
    expected = np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)])
    np.testing.assert_allclose(table[row * 3 + col], expected, rtol=1e-6)


def test_bicubic_matrix_is_pytorch_convention():
    w = torch_bicubic_matrix(16, 24)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)  # partition of unity
    grid = np.random.default_rng(0).normal(size=(16, 16, 5))
    ours = np.asarray(resize_grid_torch_bicubic(jnp.asarray(grid.reshape(256, 5), jnp.float32), 24))
    direct = bicubic_resize_torch(grid, 24).reshape(576, 5)
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-5)
    # The trap: jax.image.resize's bicubic (a = -0.5) gives different numbers.
    jax_resized = jax.image.resize(grid, (24, 24, 5), "bicubic").reshape(576, 5)
    assert np.abs(jax_resized - direct).max() > 1e-3


def test_bicubic_matrix_equals_torch_interpolate():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).normal(size=(16, 16, 4)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(24, 24), mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).reshape(576, 4).numpy()
    ours = np.asarray(resize_grid_torch_bicubic(jnp.asarray(grid.reshape(256, 4)), 24))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_official_matches_numpy_reference_for_several_m():
    cfg = tiny_config("official")
    _, params, features, run = make(cfg)
    full = np.asarray(run(np.full(3, 16)))
    ref = official_resampler(params, features, cfg.query, cfg.vision.grid_size)
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    for n in (1, 2, 7, 16):  # token i never depends on m: truncation == slicing
        truncated = np.asarray(run(np.full(3, n), n))
        np.testing.assert_allclose(truncated, full[:, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_qformer_prefix_mask_equals_truncation(n):
    cfg = tiny_config("qformer", "prefix")
    _, _, _, run = make(cfg)
    masked = np.asarray(run([n, n, n]))[:, :n]
    truncated = np.asarray(run([n, n, n], n))
    assert truncated.shape == (3, n, cfg.llm.hidden)
    np.testing.assert_allclose(masked, truncated, rtol=1e-5, atol=1e-5 * np.abs(truncated).max())


def test_qformer_prefix_mixed_m_in_one_batch():
    cfg = tiny_config("qformer", "prefix")
    _, _, _, run = make(cfg)
    mixed = np.asarray(run([1, 5, 16]))
    for b, n in enumerate((1, 5, 16)):
        alone = np.asarray(run([n] * 3, n))[b]
        np.testing.assert_allclose(mixed[b, :n], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    # The mask matters: with prefix masking the first token depends on m.
    assert np.abs(mixed[0, 0] - np.asarray(run([16] * 3))[0, 0]).max() > 1e-3


def test_qformer_causal_tokens_do_not_depend_on_m():
    cfg = tiny_config("qformer", "causal")
    _, _, _, run = make(cfg)
    full = np.asarray(run([16, 16, 16]))
    np.testing.assert_allclose(np.asarray(run([1, 3, 9])), full, rtol=1e-6, atol=1e-6)
    for n in (1, 4, 16):
        np.testing.assert_allclose(np.asarray(run([n] * 3, n)), full[:, :n], rtol=1e-5, atol=1e-5)


def test_mlp2x_gelu_projector_is_linear_exact_gelu_linear_on_every_patch():
    from math import erf

    base = tiny_config()  # 4 x 4 patches of width 32
    cfg = base.__class__(vision=base.vision, llm=base.llm, query=QueryTransformerConfig(
        variant="mlp2x_gelu", num_queries=16, width=32, num_heads=4))
    _, params, features, run = make(cfg)
    p = jax.tree.map(np.asarray, nn.meta.unbox(params))
    h = features.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))  # torch nn.GELU(): the exact one
    want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(run(np.full(3, 16)), want, rtol=2e-5, atol=2e-5)


def fixed_token_config(variant, num_queries, **query_kw):
    base = tiny_config()  # 4 x 4 patches of width 32, LLM width 48
    return base.__class__(vision=base.vision, llm=base.llm, query=QueryTransformerConfig(
        variant=variant, num_queries=num_queries, width=32, num_heads=4, **query_kw))


def test_adaptive_pool_matrix_hand_computed():
    # 5 -> 3 cells: [0, 2), [1, 4), [3, 5) (overlapping, as torch's adaptive pooling)
    want = np.array([[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
    np.testing.assert_allclose(adaptive_pool_matrix(5, 3), want, rtol=1e-7)


@pytest.mark.parametrize("num_queries", [1, 3, 4, 9, 16])
def test_avgpool_equals_torch_adaptive_avg_pool_then_the_mlp(num_queries):
    torch = pytest.importorskip("torch")
    cfg = fixed_token_config("avgpool", num_queries)
    _, params, features, run = make(cfg)
    side = int(np.ceil(np.sqrt(num_queries)))  # 1, 2, 2, 3, 4: the nearest square grid
    grid = torch.tensor(features.reshape(3, 4, 4, 32)).permute(0, 3, 1, 2)  # NCHW
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, side).permute(0, 2, 3, 1)
    pooled = pooled.reshape(3, side * side, 32)[:, :num_queries].double().numpy()
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
    h = torch.nn.functional.gelu(torch.tensor(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"]))
    want = h.numpy() @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    got = run(np.full(3, num_queries))
    assert got.shape == (3, num_queries, 48)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_victor_gives_every_patch_then_the_same_registers():
    cfg = fixed_token_config("victor", 3, drop_layer=1)
    _, params, features, run = make(cfg)
    out = np.asarray(run(np.full(3, cfg.num_queries)))
    assert cfg.num_queries == 16 + 3 and out.shape == (3, 19, 48)
    registers = np.asarray(nn.meta.unbox(params)["registers"])
    np.testing.assert_array_equal(out[:, 16:], np.broadcast_to(registers, (3, 3, 48)))
    mlp = fixed_token_config("mlp2x_gelu", 16)
    plain = QueryTransformer(mlp.query, out_width=48, grid_size=4)
    p = {k: v for k, v in nn.meta.unbox(params).items() if k != "registers"}
    np.testing.assert_allclose(out[:, :16], plain.apply({"params": p}, features), rtol=1e-5, atol=1e-6)


def quecc_setup(seed=0):
    cfg = fixed_token_config("quecc", 4, vision_layers=(1, 2))  # 4 x 4 grid -> 2 x 2 windows
    module = QueryTransformer(cfg.query, out_width=48, grid_size=4)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, 16, 32)).astype(np.float32)
    multi = rng.normal(size=(2, 16, 64)).astype(np.float32)
    guidance = rng.normal(size=(2, 48)).astype(np.float32)
    params = init_params(module, features, None, None, seed=seed, multi=multi, guidance=guidance)
    run = jax.jit(lambda f, mu, g: module.apply({"params": params}, f, multi=mu, guidance=g))
    return features, multi, guidance, lambda *a: np.asarray(run(*a))


def test_quecc_query_depends_only_on_the_patches_of_its_window():
    features, multi, guidance, run = quecc_setup()
    base = run(features, multi, guidance)
    assert base.shape == (2, 4, 48)
    # Patch (row 1, column 2) of the 4 x 4 grid lies in window (0, 1): token 1.
    patch, window = 1 * 4 + 2, 1
    others = [t for t in range(4) if t != window]
    for name in ("features", "multi"):
        f, mu = features.copy(), multi.copy()
        (f if name == "features" else mu)[0, patch] += 1.0
        out = run(f, mu, guidance)
        np.testing.assert_array_equal(out[:, others], base[:, others], err_msg=name)
        np.testing.assert_array_equal(out[1], base[1], err_msg=name)  # the other image
        assert np.abs(out[0, window] - base[0, window]).max() > 1e-4, name
    # The text guidance is global: every token moves.
    changed = run(features, multi, guidance + 1.0)
    assert (np.abs(changed - base).max(axis=-1) > 1e-4).all()


def test_a_new_compressor_is_one_registered_class(request):
    """The registry is what the package reads: a compressor defined here (a mean of the patch
    grid, one token) is accepted by the config, counted by flops, built by the model and
    refused by Grad-CAM, without an edit anywhere else."""
    import dataclasses

    from mqt_jax import compressors
    from mqt_jax.compressors.base import Compressor, register
    from mqt_jax.core import flops
    from mqt_jax.evaluation import gradcam
    from mqt_jax.models.vlm import VisionLanguageModel

    request.addfinalizer(lambda: compressors.REGISTRY.pop("mean_token", None))

    @register("mean_token")
    class MeanToken(Compressor):
        @nn.compact
        def __call__(self, features, m=None, num_queries=None):
            return nn.Dense(self.out_width, name="proj")(features.mean(1, keepdims=True))

        @classmethod
        def check(cls, model):
            if model.query.num_queries != 1:
                raise ValueError("mean_token makes one token")

        @classmethod
        def flops(cls, model, m, text_tokens):
            return {"projector": 2 * model.vision.width * model.llm.hidden}

    base = tiny_config()
    cfg = dataclasses.replace(base, query=dataclasses.replace(base.query, variant="mean_token",
                                                              num_queries=1))
    assert cfg.compressor is MeanToken and not cfg.has_m and cfg.num_queries == 1
    with pytest.raises(ValueError, match="mean_token makes one token"):  # where a model is built
        VisionLanguageModel(dataclasses.replace(cfg, query=dataclasses.replace(cfg.query,
                                                                               num_queries=4)))
    parts = flops.inference_flops(cfg, 1, text_tokens=10)
    assert parts["projector"] == 2 * cfg.vision.width * cfg.llm.hidden
    assert parts["llm_prefill"] == flops.llm_flops(cfg.llm, 11)
    images = np.random.default_rng(0).random((2, cfg.vision.image_size, cfg.vision.image_size, 3))
    model = VisionLanguageModel(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(images, jnp.float32),
                        jnp.ones((2,), jnp.int32), method=VisionLanguageModel.visual_tokens)
    tokens = model.apply(params, jnp.asarray(images, jnp.float32), jnp.ones((2,), jnp.int32),
                         method=VisionLanguageModel.visual_tokens)
    assert tokens.shape == (2, 1, cfg.llm.hidden)
    with pytest.raises(ValueError, match="the mean_token compressor has none"):
        gradcam.check_variant(cfg)
    with pytest.raises(ValueError, match="expected one of .*'mean_token'"):
        dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, variant="nope")).compressor


def test_m3_is_the_projector_then_average_pooling_at_every_scale():
    """Each row's first m tokens equal the projected grid average-pooled to sqrt(m) x sqrt(m)
    (float64 reference), with rows of different scales in one call; the really truncated
    computation gives the same tokens."""
    from numpy_reference import m3_tokens

    cfg = tiny_config("m3")  # 4 x 4 patches: scales 1, 4, 16
    assert cfg.compressor.valid_m(cfg) == (1, 4, 16) and cfg.has_m
    module, params, features, run = make(cfg, batch=3)
    for m in ([1, 4, 16], [16, 1, 4], [4, 4, 4]):
        out = np.asarray(run(m))
        for row, n in enumerate(m):
            ref = m3_tokens(params, features[row:row + 1], cfg.vision.grid_size, n)[0]
            np.testing.assert_allclose(out[row, :n], ref, rtol=1e-5, atol=1e-5)
            truncated = np.asarray(run([n] * 3, n))[row]
            np.testing.assert_allclose(truncated, out[row, :n], rtol=1e-6, atol=1e-6)


def test_m3_serves_its_scales_only():
    import dataclasses

    cfg = tiny_config("m3")
    with pytest.raises(ValueError, match=r"m=\[2, 8\]: the m3 compressor serves m in \[1, 4, 16\]"):
        cfg.check_m([1, 2, 8, 16])
    picked = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, scales=(1, 16)))
    assert picked.compressor.valid_m(picked) == (1, 16)
    from mqt_jax.compressors import check

    for scales in ((1, 9), (0, 4)):
        with pytest.raises(ValueError, match="not squares whose side divides"):
            check(dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, scales=scales)))
    with pytest.raises(ValueError, match="m3 pools the projected patch grid"):
        check(tiny_config("m3", num_queries=4))
    from mqt_jax.config import EvalConfig
    from mqt_jax.evaluation.evaluate import m_values_for

    assert m_values_for(EvalConfig(m_values=(1, 2, 4, 8)), cfg) == [1, 4, 16]


def test_official_local_init_ties_the_key_to_the_query_so_attention_starts_local():
    """Trainer.init_params applies the compressor's hook: with local_init s the key
    projection starts as s x the query projection (every other weight as the plain init) and
    the attention of query i over the grid (numpy, from the initial weights) is far sharper."""
    import dataclasses

    from numpy_reference import layer_norm

    from mqt_jax.config import MeshConfig, TrainConfig
    from mqt_jax.core import sharding
    from mqt_jax.training.trainer import Trainer

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    plain_cfg = tiny_config("official")
    local_cfg = dataclasses.replace(plain_cfg, query=dataclasses.replace(plain_cfg.query, local_init=16.0))
    init = lambda cfg: nn.meta.unbox(Trainer(cfg, TrainConfig(batch_size=2, seq_len=64), mesh)  # noqa: E731
                                     .init_params(jax.random.key(0)))["query_transformer"]
    plain, local = init(plain_cfg), init(local_cfg)
    q_kernel = np.asarray(plain["attn"]["query"]["kernel"])
    np.testing.assert_array_equal(np.asarray(local["attn"]["key"]["kernel"]), 16.0 * q_kernel)
    rest = lambda p: {k: v for k, v in jax.tree_util.tree_leaves_with_path(p)  # noqa: E731
                      if "key" not in jax.tree_util.keystr(k)}
    for a, b in zip(rest(plain).values(), rest(local).values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def entropy(p):  # mean over queries and heads, as a share of the uniform one's
        q_cfg = plain_cfg.query
        pos = np.asarray(p["pos_embed"], np.float64)
        q = layer_norm(np.asarray(p["query"], np.float64) + pos, p["ln_q"], q_cfg.layer_norm_eps)
        k = layer_norm(pos, p["ln_k"], q_cfg.layer_norm_eps)  # grid 4 = sqrt(M): no resize
        heads = q_cfg.num_heads
        q = (q @ np.asarray(p["attn"]["query"]["kernel"]).reshape(q.shape[1], -1)).reshape(len(q), heads, -1)
        k = (k @ np.asarray(p["attn"]["key"]["kernel"]).reshape(k.shape[1], -1)).reshape(len(k), heads, -1)
        logits = np.einsum("ihd,phd->hip", q, k) / np.sqrt(q.shape[-1])
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        return float(-(a * np.log(a)).sum(-1).mean() / np.log(a.shape[-1]))

    for bad in (dict(local_init=-1.0), dict(local_init=4.0, variant="qformer")):
        with pytest.raises(ValueError, match="local_init"):
            dataclasses.replace(plain_cfg.query, **bad)
    assert plain_cfg.vision.grid_size ** 2 == plain_cfg.query.num_queries
    assert entropy(plain) > 0.9 and entropy(local) < 0.4, (entropy(plain), entropy(local))  # 0.96, 0.30
