"""The single graph (all M tokens, m as data) equals really truncating to m."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import conversation, init_params, random_batch, tiny_config

from mqt_jax.config import MeshConfig
from mqt_jax.core import splice
from mqt_jax.models.loss import cross_entropy
from mqt_jax.models.vlm import VisionLanguageModel
from mqt_jax.training.trainer import CompileCounter

M_SET = (1, 2, 4, 8, 16)  # M = 16


def truncated_reference(model, params, image, example, n):
    """Slice the queries to n and build the shorter sequence by concatenation."""
    tokens = np.asarray(example.tokens)
    at = int(np.flatnonzero(tokens == splice.IMAGE_TOKEN)[0])
    logits = _reference_logits(model, params, image, tokens[:at], tokens[at + 1:], n)
    labels = np.concatenate([example.labels[:at], [splice.IGNORE] * n, example.labels[at + 1:]])
    return np.asarray(logits, np.float64), labels


@partial(jax.jit, static_argnums=(0, 5))
def _reference_logits(model, params, image, before, after, n):
    def run(mdl):
        visual = mdl.visual_tokens(image[None], None, n)  # only n queries exist
        x = jnp.concatenate([mdl.llm.embed(before[None]), visual, mdl.llm.embed(after[None])], 1)
        length = x.shape[1]
        return mdl.llm(x, jnp.arange(length)[None], jnp.ones((1, length), jnp.int32))[0]

    return model.apply(params, method=run)


def reference_loss_terms(logits, labels):
    """Sum of next-token negative log-likelihoods and their count, in float64."""
    targets = labels[1:]
    keep = targets != splice.IGNORE
    logp = logits[:-1] - np.log(np.exp(logits[:-1] - logits[:-1].max(-1, keepdims=True)).sum(-1,
           keepdims=True)) - logits[:-1].max(-1, keepdims=True)
    return -logp[np.flatnonzero(keep), targets[keep]].sum(), keep.sum()


@pytest.mark.parametrize("variant,query_mask", [
    ("official", "prefix"), ("qformer", "prefix"), ("qformer", "causal"), ("m3", "prefix")])
def test_single_graph_equals_truncation_for_every_m(variant, query_mask):
    cfg = tiny_config(variant, query_mask)
    model = VisionLanguageModel(cfg)
    base = random_batch(cfg, [16, 16, 16])
    params = {"params": init_params(model, base, method="logits")}

    @jax.jit
    def single_graph_logits(p, b):
        return model.apply(p, b, method="logits")

    @jax.jit
    def single_graph_loss(p, b):
        return cross_entropy(single_graph_logits(p, b), b["targets"], b["loss_mask"])[0]

    rng = np.random.default_rng(1)
    examples = [conversation(rng, cfg.llm.vocab_size) for _ in range(3)]
    m_rows = [[m] * 3 for m in M_SET] + [[1, 8, 16], [16, 2, 4]]  # uniform, then mixed batches
    if variant == "m3":  # its scales on 4 x 4 patches
        m_rows = [[1] * 3, [4] * 3, [16] * 3, [1, 4, 16], [16, 1, 4]]
    with CompileCounter() as compiles:
        for m in m_rows:
            batch = random_batch(cfg, m, examples=examples)
            logits = np.asarray(single_graph_logits(params, batch))
            nll, count = 0.0, 0
            for b, n in enumerate(m):
                ref, labels = truncated_reference(model, params, batch["images"][b, 0], examples[b], n)
                scale = np.abs(ref).max()
                np.testing.assert_allclose(logits[b, : len(ref)], ref, rtol=1e-5, atol=1e-5 * scale,
                                           err_msg=f"{variant}/{query_mask} m={m} row {b}")
                row_nll, row_count = reference_loss_terms(ref, labels)
                nll, count = nll + row_nll, count + row_count
            loss = float(single_graph_loss(params, batch))
            assert loss == pytest.approx(nll / count, rel=1e-5), (m, loss, nll / count)
    # One graph for every m: each function compiled once over all the batches.
    assert compiles.counts["jit(single_graph_logits)"] == 1, compiles.counts
    assert compiles.counts["jit(single_graph_loss)"] == 1, compiles.counts


def test_visual_tokens_beyond_m_do_not_reach_the_llm():
    cfg = tiny_config("official")
    model = VisionLanguageModel(cfg)
    batch = random_batch(cfg, [3, 3])
    params = init_params(model, batch, method="logits")
    logits = jax.jit(lambda p: model.apply({"params": p}, batch, method="logits"))
    base = np.asarray(logits(params))
    # Scramble every query after the first 3: logits must not move.
    query = params["query_transformer"]["query"]
    params["query_transformer"]["query"] = query.at[3:].set(query[3:] * -5 + 1)
    np.testing.assert_array_equal(np.asarray(logits(params)), base)


def test_quecc_guidance_is_the_llms_own_reading_of_the_question_alone_without_gradient():
    base = tiny_config()  # 4 x 4 patches -> 2 x 2 windows
    cfg = base.__class__(vision=base.vision, llm=base.llm, query=base.query.__class__(
        variant="quecc", num_queries=4, width=32, num_heads=4, vision_layers=(1, 2)))
    model = VisionLanguageModel(cfg)
    rng = np.random.default_rng(0)
    examples = [conversation(rng, cfg.llm.vocab_size, before=2, after=4) for _ in range(2)]
    batch = random_batch(cfg, [4, 4], seq_len=24, examples=examples)
    params = init_params(model, batch, method="logits")
    inputs = [jnp.asarray(batch[k]) for k in
              ("token_ids", "visual_index", "positions", "segment_ids", "question_end")]

    def guidance(p, *a):
        return model.apply({"params": p}, model.apply({"params": p}, a[0], method=lambda m, t:
                           m.llm.embed(t)), *a[1:], method="question_states")

    got = np.asarray(jax.jit(guidance)(params, *inputs))  # [B, 1, hidden]
    for row, example in enumerate(examples):
        # The question alone: the example's tokens before its answer, the image deleted.
        tokens = np.asarray(example.tokens)
        at = int(np.flatnonzero(tokens == splice.IMAGE_TOKEN)[0])
        end = len(tokens) - 3  # 3 answer tokens
        text = np.concatenate([tokens[:at], tokens[at + 1:end]])
        positions = np.concatenate([np.arange(at), at + 4 + np.arange(end - at - 1)])  # m = 4
        want = model.apply({"params": params}, text[None], positions[None],
                           np.ones((1, len(text)), np.int32), method=lambda m, t, p, s:
                           m.llm.hidden_states(m.llm.embed(t), p, s))[0, -1]
        assert batch["question_end"][row, 0] == at + 4 + (end - at - 1) - 1
        np.testing.assert_allclose(got[row, 0], want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: guidance(p, *inputs).sum())(params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))  # no gradient


@pytest.mark.parametrize("variant", ["official", "victor"])
def test_abstract_params_are_the_trainers_without_building_one(variant):
    """The model says its own parameter shapes, dtypes and shardings (what inference restores
    into) exactly as the training state holds them."""
    import dataclasses

    from mqt_jax.config import TrainConfig
    from mqt_jax.core import sharding
    from mqt_jax.models.vlm import abstract_params
    from mqt_jax.training.trainer import Trainer

    cfg = tiny_config()
    if variant == "victor":
        cfg = dataclasses.replace(cfg, query=dataclasses.replace(
            cfg.query, variant="victor", num_queries=4, drop_layer=1))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    seq_len = cfg.dropped_per_image + 64
    ours = abstract_params(cfg, mesh)
    theirs = Trainer(cfg, TrainConfig(batch_size=4, seq_len=seq_len), mesh).abstract_params()
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert a.sharding.is_equivalent_to(b.sharding, len(a.shape))
