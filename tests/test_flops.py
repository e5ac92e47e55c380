"""Analytical FLOPs against XLA's own count of the compiled functions, and the paper's claim."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import init_params, tiny_config

from mqt_jax.core import flops
from mqt_jax.models.vlm import VisionLanguageModel


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture(scope="module")
def one_layer():
    """One layer per stack: XLA counts a scanned layer's body once, so compare per layer."""
    cfg = tiny_config(num_queries=16)
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, num_layers=2),  # select -2: 1 layer built
        # wide enough that elementwise work (norms, RoPE, softmax) is the few percent it is
        # in real models, not a third of a 48-wide toy's decode step
        llm=dataclasses.replace(cfg.llm, num_layers=1, hidden=128, num_heads=4, num_kv_heads=2,
                                head_dim=32, mlp_dim=256))
    model = VisionLanguageModel(cfg)
    images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3))  # one image
    params = init_params(model, images, jnp.full((1,), 16, jnp.int32), method="visual_tokens")
    llm_params = init_params(model, jnp.zeros((1, 24, cfg.llm.hidden)), jnp.zeros((1, 24), jnp.int32),
                             jnp.ones((1, 24), jnp.int32), method=lambda mdl, x, p, s: mdl.llm(x, p, s))
    return cfg, model, {**params, **llm_params}, images


def close(xla, analytical):
    assert abs(xla - analytical) <= 0.1 * analytical, (xla, analytical)


def test_vision_tower_flops_match_xla(one_layer):
    cfg, model, params, images = one_layer
    xla = xla_flops(lambda p, x: model.apply({"params": p}, x, method=lambda mdl, x: mdl.vision_tower(x)),
                    params, images)
    close(xla, flops.vision_flops(cfg.vision))


@pytest.mark.parametrize("n", [4, 16])
def test_query_transformer_flops_match_xla(one_layer, n):
    cfg, model, params, images = one_layer
    feats = jnp.zeros((1, cfg.vision.num_patches, cfg.vision.width))
    xla = xla_flops(lambda p, f: model.apply(
        {"params": p}, f, method=lambda mdl, f: mdl.query_transformer(f, None, n)), params, feats)
    close(xla, flops.inference_flops(cfg, n, 0)["query"])


@pytest.mark.parametrize("tokens", [24, 64])
def test_llm_prefill_and_decode_flops_match_xla(one_layer, tokens):
    cfg, model, params, _ = one_layer
    x = jnp.zeros((1, tokens, cfg.llm.hidden))
    ids = jnp.ones((1, tokens), jnp.int32)
    prefill = xla_flops(lambda p, x, i: model.apply(
        {"params": p}, x, i, i, tokens + 8, method=lambda mdl, *a: mdl.llm.prefill(*a)), params, x, ids)
    # the prefill runs against the preallocated cache: tokens x (tokens + 8) attention pairs
    close(prefill, flops.llm_flops(cfg.llm, tokens, tokens + 8))
    _, cache = model.apply({"params": params}, x, ids, ids, tokens + 8,
                           method=lambda mdl, *a: mdl.llm.prefill(*a))
    decode = xla_flops(lambda p, t, c: model.apply(
        {"params": p}, t, c, method=lambda mdl, t, c: mdl.llm.decode(t, c)), params, ids[:, :1], cache)
    close(decode, flops.llm_flops(cfg.llm, 1, tokens + 8))


def test_the_papers_claim_on_the_7b_config():
    """MQT-LLaVA-7B: m = 256 costs about half the FLOPs of LLaVA-1.5's 576 tokens, m = 16
    about an eighth of the rest (the vision tower's 0.37 TFLOPs are the same for both)."""
    from mqt_jax import cli
    from mqt_jax.config import ModelConfig

    cli.parse_gin(["mqt_llava_7b_stage2.gin"], [])
    cfg = ModelConfig()
    llava = flops.llava_flops(cfg, text_tokens=64)
    at = {m: flops.inference_flops(cfg, m, text_tokens=64) for m in (16, 256)}
    assert 0.45 < at[256]["total"] / llava["total"] < 0.55
    llm = lambda f: f["total"] - f["vision"]  # noqa: E731
    assert 1 / 9 < llm(at[16]) / llm(llava) < 1 / 7
    # by hand: 23 built ViT-L layers x 2 x 577 x (4 x 1024^2 + 2 x 1024 x 4096) + attention
    assert llava["vision"] == at[16]["vision"] == pytest.approx(0.366e12, rel=0.01)


@pytest.mark.parametrize("variant,num_queries", [
    ("qformer", 16), ("avgpool", 9), ("mlp2x_gelu", 16), ("quecc", 4)])
def test_other_compressors_flops_match_xla(one_layer, variant, num_queries):
    from mqt_jax.compressors import build as QueryTransformer
    from mqt_jax.config import ModelConfig, QueryTransformerConfig

    base = one_layer[0]  # 4 x 4 patches; widths where matmuls dominate (an exact GELU costs
    # XLA about 70 FLOPs per element):
    vision = dataclasses.replace(base.vision, width=128, mlp_dim=256)
    q = QueryTransformerConfig(variant=variant, num_queries=num_queries, width=128, num_heads=4,
                               num_layers=1, mlp_dim=256, vision_layers=(0, 1))
    cfg = ModelConfig(vision=vision, query=q, llm=dataclasses.replace(base.llm, hidden=512))
    module = QueryTransformer(q, out_width=cfg.llm.hidden, grid_size=cfg.vision.grid_size)
    feats = jnp.zeros((1, cfg.vision.num_patches, cfg.vision.width))
    kw = {"multi": jnp.zeros((1, 16, 256)), "guidance": jnp.zeros((1, 512))} if variant == "quecc" else {}
    params = init_params(module, feats, jnp.full((1,), num_queries, jnp.int32), **kw)
    xla = xla_flops(lambda p, f: module.apply({"params": p}, f, jnp.full((1,), num_queries), **kw),
                    params, feats)
    parts = flops.inference_flops(cfg, num_queries, text_tokens=0)
    close(xla, parts.get("query", parts.get("projector")))


def test_victor_prefill_flops_on_the_7b_config():
    """Vicuna-7B, 576 patches + 8 registers, drop at layer 3 of 32, 64 text tokens: the LLM
    runs 3 layers on 648 tokens and 29 on 72, about a fifth of LLaVA-1.5's 32 on 640."""
    from mqt_jax import cli
    from mqt_jax.config import ModelConfig

    cli.parse_gin(["mqt_llava_7b_model.gin"], ["QueryTransformerConfig.variant = 'victor'",
                                                 "QueryTransformerConfig.num_queries = 8"])
    cfg = ModelConfig()
    victor, llava = flops.inference_flops(cfg, cfg.num_queries, 64), flops.llava_flops(cfg, 64)
    assert victor["projector"] == llava["projector"]  # every patch is projected
    ratio = victor["llm_prefill"] / llava["llm_prefill"]
    assert ratio == pytest.approx((3 * 648 + 29 * 72) / (32 * 640), rel=0.05)


@pytest.mark.parametrize("which", ["tiny", "7b"])
def test_llm_parameters_counts_the_built_model(which):
    from mqt_jax.config import LLMConfig
    from mqt_jax.models.llama import Llama

    llm = tiny_config().llm if which == "tiny" else LLMConfig()
    x, ids = jnp.zeros((1, 4, llm.hidden)), jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Llama(llm).init(jax.random.key(0), x, ids, ids))
    built = sum(a.size for a in jax.tree.leaves(shapes))
    assert flops.llm_parameters(llm) == built
    if which == "7b":
        assert built == 6_738_415_616  # LLaMA-2-7B


def test_raising_m_flops_match_xla(one_layer):
    """The extension of a prefill cache: n new tokens against the cache's S slots."""
    cfg, model, params, _ = one_layer
    n, slots = 20, 64
    x = jnp.zeros((1, n, cfg.llm.hidden))
    ids, start = jnp.ones((1, n), jnp.int32), jnp.array([30], jnp.int32)
    _, cache = model.apply({"params": params}, jnp.zeros((1, 30, cfg.llm.hidden)),
                           jnp.ones((1, 30), jnp.int32), jnp.ones((1, 30), jnp.int32), slots,
                           method=lambda mdl, *a: mdl.llm.prefill(*a))
    xla = xla_flops(lambda p, x, c: model.apply(
        {"params": p}, x, ids, ids, c, start, method=lambda mdl, *a: mdl.llm.extend(*a)),
        params, x, cache)
    head = 2 * cfg.llm.hidden * cfg.llm.vocab_size  # the last token's logits only
    close(xla, flops.llm_flops(cfg.llm, n, slots, head=False) + head)


def test_escalation_flops_count_the_towers_once_and_only_the_added_tokens():
    cfg = tiny_config(num_queries=16)
    llm, towers = cfg.llm, flops.inference_flops(cfg, 16, 0)
    vision_and_query = towers["vision"] + towers["query"]  # all M tokens, once
    one = flops.escalation_prefill_flops(cfg, [4], before=10, after=6)
    assert one == pytest.approx(vision_and_query + flops.llm_flops(llm, 20))
    two = flops.escalation_prefill_flops(cfg, [4, 16], before=10, after=6)
    assert two - one == pytest.approx(flops.llm_flops(llm, 12 + 6, 10 + 16 + 6))
    fresh = flops.inference_flops(cfg, 16, 16)["total"]
    assert one < fresh < two  # a raise costs less than starting over, but is not free


def test_train_step_flops_by_hand():
    """One layer, hidden 4, 2 heads of 2 (no GQA), MLP 8, vocab 10; 3 tokens, 2 rows."""
    from mqt_jax.config import LLMConfig

    llm = LLMConfig(vocab_size=10, hidden=4, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=2, mlp_dim=8)
    t = 3
    layer = 2 * t * (4 * 4 + 2 * 4 * 4 + 4 * 4 + 3 * 4 * 8) + 4 * t * t * 4  # matmuls + attention
    head = 2 * t * 4 * 10
    forward = layer + head
    assert flops.train_step_flops(llm, 2, t, "dots_saveable") == 2 * 3 * forward
    assert flops.train_step_flops(llm, 2, t, "nothing_saveable") == 2 * (3 * forward + layer)
    assert flops.train_step_flops(llm, 2, t, "dots_with_no_batch_dims_saveable") == \
        2 * (3 * forward + 4 * t * t * 4)
