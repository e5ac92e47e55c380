import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init_params, tiny_config

from mqt_jax.config import MeshConfig, ModelConfig, TrainConfig
from mqt_jax.core import sharding, splice
from mqt_jax.inference.generate import (
    Generator,
    SamplingConfig,
    cut_at_eos,
    cut_at_stop,
    next_token,
    prompt_batch,
    stop_tokens,
)
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel
from mqt_jax.training.trainer import CompileCounter, Trainer

EOS = 2


def prompts(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:  # BOS, 2 words, <image>, the rest of the question
        text = rng.integers(3, cfg.llm.vocab_size, size=n).tolist()
        tokens = [1] + text[:2] + [splice.IMAGE_TOKEN] + text[2:]
        examples.append(splice.Example(tokens, [splice.IGNORE] * len(tokens)))
    size = cfg.vision.image_size
    return examples, rng.normal(size=(len(lengths), size, size, 3)).astype(np.float32)


def varied(params):
    """A freshly initialised LLM repeats one token; larger embeddings make the greedy path
    depend on the context, so the comparison below has something to compare."""
    llm = dict(params["llm"], embedding=params["llm"]["embedding"] * 50.0)
    return dict(params, llm=llm)


def recompute_greedy(model, params, examples, images, m, num_queries, steps):
    """Reference without a cache: append each argmax to the prompt and run it all again."""
    examples = list(examples)
    out = [[] for _ in examples]
    forward = jax.jit(model.apply)
    for _ in range(steps):
        batch = prompt_batch(examples, images, m, num_queries, seq_len=64)
        logits = forward({"params": params}, *(batch[k] for k in MODEL_INPUTS))
        last = (batch["segment_ids"] > 0).sum(1) - 1
        nxt = np.asarray(jnp.argmax(logits[np.arange(len(examples)), last], -1))
        for i, t in enumerate(nxt):
            out[i].append(int(t))
            e = examples[i]
            examples[i] = splice.Example(list(e.tokens) + [int(t)], list(e.labels) + [splice.IGNORE])
    return np.array(out)


def make_generator(cfg: ModelConfig, params, mesh_shape=(1, 8, 1), eos=-1, placed=False, **sampling):
    """A Generator on an 8-device mesh; `placed`: parameters in training's shardings."""
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape))
    if placed:
        abstract = Trainer(cfg, TrainConfig(batch_size=8), mesh).abstract_params()
        params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
    return Generator(cfg, params, mesh, eos, SamplingConfig(**{"max_new_tokens": 6, **sampling}),
                     batch_size=8, bucket=8)


@pytest.mark.parametrize("m,mesh_shape", [(1, (1, 8, 1)), (16, (2, 2, 2))])
def test_cached_greedy_equals_recomputing_the_whole_sequence(m, mesh_shape):
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 9, 6])  # rows of different lengths
    batch = prompt_batch(examples, images, m, cfg.num_queries, seq_len=40)
    params = varied(init_params(model, batch, method="logits"))
    # eos_id = -1: never produced, so all 6 steps run and every token is compared. The
    # parameters are fsdp/tensor-sharded as in training on the (2, 2, 2) mesh.
    generator = make_generator(cfg, params, mesh_shape, placed=mesh_shape != (1, 8, 1))
    got = np.array(generator(examples, images, m))
    want = recompute_greedy(model, params, examples, images, m, cfg.num_queries, 6)
    np.testing.assert_array_equal(got, want)
    assert len(set(got.ravel().tolist())) > 2  # not a degenerate constant output


def test_prefill_logits_equal_the_training_forward():
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [7, 3])
    batch = prompt_batch(examples, images, 6, cfg.num_queries, seq_len=32)
    params = init_params(model, batch, method="logits")
    full = jax.jit(model.apply)({"params": params}, *(batch[k] for k in MODEL_INPUTS))
    prefill = jax.jit(functools.partial(model.apply, method="prefill"), static_argnums=8)
    pre, cache = prefill({"params": params}, *(batch[k] for k in MODEL_INPUTS), 40)
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(np.asarray(pre)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)
    assert cache["k"].shape == (cfg.llm.num_layers, 2, 40, cfg.llm.num_kv_heads, cfg.llm.head_dim)
    np.testing.assert_array_equal(np.asarray(cache["index"][0]), real.sum(1))


def test_stops_at_eos_and_cuts():
    assert cut_at_eos(np.array([[5, 2, 7], [4, 4, 4]]), 2) == [[5], [4, 4, 4]]
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 5])
    params = varied(init_params(model, prompt_batch(examples, images, 3, 16, 32), method="logits"))
    free = make_generator(cfg, params)(examples, images, 3)
    eos = free[0][1]  # pretend row 0's second token is EOS
    got = make_generator(cfg, params, eos=eos)(examples, images, 3)
    assert got[0] == free[0][:1]  # cut before it
    cut = free[1].index(eos) if eos in free[1] else len(free[1])
    assert got[1] == free[1][:cut]


def test_stop_strings():
    assert cut_at_stop("red. USER: next", ("USER:", "###")) == "red. "
    assert cut_at_stop("a###b USER:", ("USER:", "###")) == "a"
    assert cut_at_stop("plain", ("USER:",)) == "plain"
    assert cut_at_stop("plain", ()) == "plain"


def test_a_token_holding_a_stop_string_ends_its_row_with_the_same_answer():
    from mqt_jax.data.tokenizer import Tokenizer

    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 5, 6])
    params = varied(init_params(model, prompt_batch(examples, images, 3, 16, 32), method="logits"))
    words = Tokenizer(None, lambda ids: "".join(f"<{i}>" for i in ids), 1, EOS,
                      cfg.llm.vocab_size, "test")
    free = make_generator(cfg, params)(examples, images, 3)
    both = (f"<{free[0][2]}>",  # one token's own text: ends a row on device
            f"{free[1][0]}><{free[1][1]}")  # spans two tokens: only cut from the text
    ends = [row.index(free[0][2]) + 1 if free[0][2] in row else len(row) for row in free]
    stopped = make_generator(cfg, params, stop=both)
    stops = stop_tokens(words, both, cfg.llm.vocab_size)
    assert stops.nonzero()[0].tolist() == [free[0][2]]
    assert stopped(examples, images, 3, stops) == [row[:end] for row, end in zip(free, ends)]
    assert ends[0] <= 3 and stopped.texts(examples, images, 3, words) == [
        cut_at_stop(words.decode(row), both) for row in free]


def test_top_p_samples_from_the_nucleus_in_proportion():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, t, p: next_token(logits, t, p, k)[0], (0, None, None)))
    # top_p = 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8); sampled as 0.5 : 0.3.
    counts = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
    # top_p = 1: every token, in proportion to softmax(logits)
    counts = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # temperature 0.5 sharpens: p^2 renormalised
    sharp = np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365
    counts = np.bincount(np.asarray(draw(keys, 0.5, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, sharp, atol=0.03)
    # temperature 0 is the argmax whatever the key; a tiny top_p keeps only the top token
    assert set(np.asarray(draw(keys[:50], 0.0, 1.0)).tolist()) == {0}
    assert set(np.asarray(draw(keys[:50], 1.0, 0.01)).tolist()) == {0}


def test_sampling_is_seeded_and_differs_from_greedy():
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 5, 6, 7])
    params = varied(init_params(model, prompt_batch(examples, images, 3, 16, 32), method="logits"))
    greedy = make_generator(cfg, params)(examples, images, 3)
    hot = lambda seed: make_generator(cfg, params, temperature=1.5, seed=seed)(examples, images, 3)  # noqa: E731
    assert hot(1) == hot(1)
    assert hot(1) != greedy and hot(1) != hot(2)
    assert make_generator(cfg, params, temperature=1.5, top_p=1e-6)(examples, images, 3) == greedy


def test_one_compilation_per_bucket_for_any_m_and_requests():
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 5, 6], seed=1)
    params = init_params(model, prompt_batch(examples, images, 3, 16, 32), method="logits")
    # max_new_tokens = 5, used by no other test: nothing compiled before
    generator = make_generator(cfg, params, max_new_tokens=5)  # bucket 8: 5..7 tokens + m
    with CompileCounter() as compiles:
        generator(examples, images, 1)  # 6..8 tokens: bucket 8
        generator(examples[:2], images[:2], 2)  # 7..8: bucket 8, other requests
        generator(examples, images, 9)  # 14..16: bucket 16
        generator(examples[:2], images[:2], 8)  # 13..14: bucket 16
    generate_compiles = sum(n for name, n in compiles.counts.items() if "generate" in name)
    assert generate_compiles == 2, compiles.counts


@pytest.mark.parametrize("m", [0, 17, 99999999999999999999])
def test_m_outside_one_to_M_is_an_error(m):
    cfg = tiny_config(num_queries=16)
    examples, images = prompts(cfg, [4])
    with pytest.raises(ValueError, match=rf"m=\[{m}\] outside \[1, 16\]"):
        make_generator(cfg, {})(examples, images, m)  # checked before any parameter is used


def test_max_new_tokens_beyond_the_model_is_named():
    cfg = tiny_config(num_queries=16)
    examples, images = prompts(cfg, [4])
    with pytest.raises(ValueError, match=f"max_new_tokens=100000000: the model takes "
                                         f"{cfg.llm.max_length} tokens in all"):
        make_generator(cfg, {}, max_new_tokens=100_000_000)(examples, images, 4)


def test_bad_sampling_settings_are_named():
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="stop='USER:' must be a tuple"):
        SamplingConfig(stop="USER:")  # not five one-letter stops


def test_prompt_longer_than_the_bucket_is_an_error():
    cfg = tiny_config(num_queries=16)
    examples, images = prompts(cfg, [20])
    with pytest.raises(ValueError, match="does not fit seq_len=24"):
        prompt_batch(examples, images, 16, cfg.num_queries, seq_len=24)


def test_a_smaller_m_is_a_shorter_prefill():
    cfg = tiny_config(num_queries=16)
    examples, images = prompts(cfg, [5])
    lengths = {m: int((prompt_batch(examples, images, m, 16, 64)["segment_ids"] > 0).sum())
               for m in (1, 16)}
    assert lengths[16] - lengths[1] == 15


class NumberTokenizer:
    """decode only: an answer's ids as text (what sweep_answers needs of a tokenizer)."""

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("variant,query_mask", [("official", "prefix"), ("qformer", "causal")])
def test_an_m_sweep_runs_each_image_once_and_answers_as_one_pass_per_m(variant, query_mask):
    from mqt_jax.evaluation.evaluate import sweep_answers

    cfg = tiny_config(variant, query_mask, num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 9, 6, 5, 7], seed=2)
    images = images[[0, 1, 0, 2, 1]]  # 5 questions on 3 images
    params = varied(init_params(model, prompt_batch(examples, images, 4, 16, 40), method="logits"))
    generator = make_generator(cfg, params)
    visual = generator.visual_tokens(images)
    assert generator.vision_passes == 3  # one per distinct image
    for m in (1, 5, 16):  # the same tokens serve every m, equal to a fresh pass at that m
        np.testing.assert_array_equal(np.array(generator(examples, images, m, visual=visual)),
                                      np.array(generator(examples, images, m)))
    m_values = [1, 2, 8, 16]
    before = generator.vision_passes
    reused = sweep_answers(generator, examples, images, m_values, NumberTokenizer(), chunk=3)
    assert generator.vision_passes - before == 2 + 2  # chunks [0, 1, 0] and [2, 1]
    before = generator.vision_passes
    per_m = sweep_answers(generator, examples, images, m_values, NumberTokenizer(), reuse=False)
    assert generator.vision_passes - before == 5 * len(m_values)
    assert reused == per_m
    assert len({a for answers in per_m.values() for a in answers}) > 2  # not one constant answer


def test_tokens_that_depend_on_m_or_the_question_are_not_reused():
    import dataclasses

    from mqt_jax.evaluation.evaluate import sweep_answers

    base = tiny_config()
    quecc = dataclasses.replace(base, query=dataclasses.replace(
        base.query, variant="quecc", num_queries=4, vision_layers=(1, 2)))
    assert not splice.tokens_reusable(quecc)  # its tokens read the question
    m3 = tiny_config("m3")  # token i of one scale is not token i of another
    assert not splice.tokens_reusable(m3)
    cfg = tiny_config("qformer", "prefix", num_queries=16)  # token i depends on m
    assert not splice.tokens_reusable(cfg)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 6], seed=3)
    params = init_params(model, prompt_batch(examples, images, 4, 16, 32), method="logits")
    generator = make_generator(cfg, params)
    with pytest.raises(ValueError, match="cannot be computed once"):
        generator.visual_tokens(images)
    sweep_answers(generator, examples, images, [2, 16], NumberTokenizer())
    assert generator.vision_passes == 2 * 2  # each image at each m


def prompts_with_long_prefix(cfg, seed):
    """Prompts whose images sit at different depths (text before them of 2 to 12 tokens), so
    the raised chunks start at different slots."""
    examples, images = prompts(cfg, [4, 9, 6, 5, 7, 3, 8, 6, 4, 5], seed=seed)
    rng = np.random.default_rng(seed)
    for i in (1, 4, 7):
        extra = rng.integers(3, cfg.llm.vocab_size, size=10).tolist()
        tokens = [1] + extra + list(examples[i].tokens[1:])
        examples[i] = splice.Example(tokens, [splice.IGNORE] * len(tokens))
    return examples, images


@pytest.mark.parametrize("variant,query_mask", [("official", "prefix"), ("qformer", "causal")])
def test_raising_m_on_the_prefix_cache_equals_a_fresh_prefill(variant, query_mask):
    cfg = tiny_config(variant, query_mask, num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts_with_long_prefix(cfg, seed=4)
    examples, images = examples[:4], images[:4]
    params = varied(init_params(model, prompt_batch(examples, images, 4, 16, 48), method="logits"))
    apply = jax.jit(model.apply, static_argnames=("method", "last_only"), static_argnums=8)
    visual = model.apply({"params": params}, images, np.full(4, 16, np.int32), method="visual_tokens")
    m_from, m_to = np.array([1, 4, 2, 15]), np.array([16, 5, 8, 16])  # one raise per row

    def prefill(m, seq_len):
        batch = prompt_batch(examples, images, m, 16, seq_len)
        return apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), 64, visual=visual,
                     last_only=True, method="prefill")

    _, cache = prefill(m_from, 32)
    chunk, start = splice.raised_rows(examples, m_from, m_to, 16, seq_len=32)
    np.testing.assert_array_equal(start, [3 + 1, 13 + 4, 3 + 2, 3 + 15])
    raised, raised_cache = apply({"params": params}, visual, chunk["token_ids"],
                                 chunk["visual_index"], chunk["positions"], chunk["segment_ids"],
                                 cache, start, method="extend")
    fresh, fresh_cache = prefill(m_to, 48)
    np.testing.assert_allclose(raised, fresh, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(raised_cache["index"], fresh_cache["index"])
    for row, length in enumerate(np.asarray(fresh_cache["index"][0])):  # every slot in use
        for k in ("k", "v"):
            np.testing.assert_allclose(raised_cache[k][:, row, :length],
                                       fresh_cache[k][:, row, :length], rtol=1e-5, atol=1e-5)
    assert not np.allclose(prefill(m_from, 32)[0], fresh, atol=1e-3)  # m changes the answer


def test_raised_rows_are_checked():
    cfg = tiny_config(num_queries=16)
    examples, _ = prompts(cfg, [4, 6])
    with pytest.raises(ValueError, match="m_to > m_from"):
        splice.raised_rows(examples, 4, 4, 16, 32)
    with pytest.raises(ValueError, match="outside"):
        splice.raised_rows(examples, 4, 17, 16, 32)
    with pytest.raises(ValueError, match="does not fit"):
        splice.raised_rows(examples, 1, 16, 16, 8)
    text_only = splice.Example([1, 5, 6], [splice.IGNORE] * 3)
    with pytest.raises(ValueError, match="one image per prompt"):
        splice.raised_rows([text_only], 1, 2, 16, 32)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])  # rows climb in 8s; in 4s or 8s
def test_escalating_answers_each_rung_as_a_fresh_generation_would(mesh_shape):
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts_with_long_prefix(cfg, seed=5)  # 10 prompts: two batches of 8
    params = varied(init_params(model, prompt_batch(examples, images, 4, 16, 48), method="logits"))
    generator = make_generator(cfg, params, mesh_shape)
    ladder = [1, 4, 16]
    fresh = {m: generator.generate(examples, images, m) for m in ladder}
    assert any(fresh[1][i].ids != fresh[16][i].ids for i in range(10))  # m matters here

    def check(accept):
        before = generator.vision_passes
        got = generator.escalate(examples, images, ladder, accept)
        assert generator.vision_passes - before == 10  # one per image, whatever the rungs
        for i, g in enumerate(got):
            rungs = [m for m in ladder if accept(fresh[m][i])][:1] or [ladder[-1]]
            want = fresh[rungs[0]][i]
            assert g.tried == tuple(ladder[: ladder.index(want.m) + 1])
            assert (g.ids, g.m, g.eos_logprob is None) == (want.ids, want.m, want.eos_logprob is None)
            np.testing.assert_allclose(g.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(g.margin, want.margin, rtol=1e-4, atol=1e-5)
        return got

    assert {g.m for g in check(lambda a: False)} == {16}
    assert {g.m for g in check(lambda a: True)} == {1}
    sure = np.median([g.margin for m in ladder for g in fresh[m]])
    mixed = check(lambda a: a.margin > sure)  # rows leave the ladder at different rungs
    assert {g.m for g in mixed} == set(ladder)
    with pytest.raises(ValueError, match="increase"):
        generator.escalate(examples, images, [4, 1], lambda a: False)
