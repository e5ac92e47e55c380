import jax
import numpy as np
import pytest
from helpers import init_params, tiny_config
from numpy_reference import llama as llama_reference

from mqt_jax.config import LLMConfig
from mqt_jax.models.llama import Llama


def setup(cfg, batch=2, length=10, seed=0):
    model = Llama(cfg)
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, length, cfg.hidden)).astype(np.float32)
    pos = np.tile(np.arange(length), (batch, 1))
    seg = np.ones((batch, length), np.int32)
    params = init_params(model, emb, pos, seg, seed=seed)
    apply = jax.jit(lambda e, p, s: model.apply({"params": params}, e, p, s))
    run = lambda e, p, s: np.asarray(apply(e, p, s))  # noqa: E731
    return params, emb, pos, seg, run


def test_matches_numpy_reference_with_grouped_query_attention():
    cfg = tiny_config().llm  # 6 query heads over 2 kv heads
    params, emb, pos, seg, run = setup(cfg)
    ref = llama_reference(params, emb, pos, seg, cfg)
    np.testing.assert_allclose(run(emb, pos, seg), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_packed_segments_equal_separate_sequences():
    cfg = tiny_config().llm
    params, emb, _, _, run = setup(cfg, batch=1, length=10)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    packed = run(emb, pos, seg)
    first = run(emb[:, :4], np.arange(4)[None], np.ones((1, 4), np.int32))
    second = run(emb[:, 4:9], np.arange(5)[None], np.ones((1, 5), np.int32))
    np.testing.assert_allclose(packed[:, :4], first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:9], second, rtol=1e-5, atol=1e-5)


def test_explicit_positions_are_used():
    cfg = tiny_config().llm
    _, emb, pos, seg, run = setup(cfg)
    base = run(emb, pos, seg)
    # RoPE is relative: shifting every position leaves logits unchanged...
    np.testing.assert_allclose(run(emb, pos + 11, seg), base, rtol=1e-4, atol=1e-4)
    # ...but changing the gaps between positions changes them.
    assert np.abs(run(emb, pos * 2, seg) - base).max() > 1e-3


def test_llama_2_7b_parameter_count():
    cfg = LLMConfig()
    emb = jax.ShapeDtypeStruct((1, 8, 4096), np.float32)
    ints = jax.ShapeDtypeStruct((1, 8), np.int32)
    params = jax.eval_shape(Llama(cfg).init, jax.random.key(0), emb, ints, ints)
    assert sum(x.size for x in jax.tree.leaves(params)) == 6_738_415_616


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        LLMConfig(num_heads=6, num_kv_heads=4)


def test_scanned_layers_keep_the_program_size_independent_of_depth():
    def program_lines(num_layers):
        cfg = LLMConfig(vocab_size=64, hidden=32, num_layers=num_layers, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_dim=64)
        emb = jax.ShapeDtypeStruct((1, 8, 32), np.float32)
        ints = jax.ShapeDtypeStruct((1, 8), np.int32)
        model = Llama(cfg)
        params = jax.eval_shape(model.init, jax.random.key(0), emb, ints, ints)
        loss = lambda p, e, i: model.apply(p, e, i, i).sum()  # noqa: E731
        return len(jax.jit(jax.grad(loss)).lower(params, emb, ints).as_text().splitlines())

    assert program_lines(2) == program_lines(12)  # one scanned body, whatever the depth


def victor_setup(drop_layer, seed=0):
    cfg = LLMConfig(vocab_size=64, hidden=48, num_layers=3, num_heads=6, num_kv_heads=2,
                    head_dim=8, mlp_dim=80, rope_theta=500.0)
    model = Llama(cfg, drop_layer=drop_layer)
    rng = np.random.default_rng(seed)
    t = 14
    emb = rng.normal(size=(2, t, cfg.hidden)).astype(np.float32)
    pos = np.tile(np.arange(t), (2, 1))
    seg = np.ones((2, t), np.int32)
    seg[1, 12:] = 0  # row 1 ends in padding
    dropped = np.zeros((2, t), bool)
    dropped[0, 2:8] = True  # 6 visual tokens, different places per row
    dropped[1, 4:10] = True
    kept_len = t - 6
    params = init_params(model, emb, pos, seg, dropped, seed=seed,
                         method=lambda mdl, *a: mdl(*a, kept_len=kept_len))
    return cfg, model, params, emb, pos, seg, dropped, kept_len


@pytest.mark.parametrize("drop_layer", [1, 2])
def test_victor_logits_equal_deleting_the_visual_states_at_the_drop_layer(drop_layer):
    cfg, model, params, emb, pos, seg, dropped, kept_len = victor_setup(drop_layer)
    got = np.asarray(jax.jit(lambda *a: model.apply({"params": params}, *a, kept_len))(
        emb, pos, seg, dropped))
    for row in range(2):
        keep = ~dropped[row] & (seg[row] > 0)
        want = llama_reference(params, emb[row:row + 1], pos[row:row + 1], seg[row:row + 1], cfg,
                               drop_at=drop_layer, keep=keep)[0]
        np.testing.assert_allclose(got[row][keep], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert not got[row][~keep].any()  # no logits where nothing is left
    # The drop matters: the same layers without it give other logits after the visual tokens.
    plain = np.asarray(Llama(cfg).apply({"params": params}, emb, pos, seg))
    assert np.abs(plain[0, 8:] - got[0, 8:]).max() > 1e-3


@pytest.mark.parametrize("method", ["decode", "decode_in_place"])
def test_victor_decode_with_the_cache_equals_the_full_forward(method):
    """Prefill keeps every position's keys in the layers before the drop and the survivors'
    after it; decoding continues each layer from its own cache (sliced per layer by the scan,
    or written where it lies by decode_in_place)."""
    cfg, model, params, emb, pos, seg, dropped, kept_len = victor_setup(drop_layer=2)
    prompt_len, new = 12, 2  # both rows: a 12-token prompt, then two tokens fed one by one
    seg = np.ones((2, prompt_len), np.int32)
    emb, pos, dropped = emb[:, :prompt_len], pos[:, :prompt_len], dropped[:, :prompt_len]
    tokens = np.array([[5, 9], [17, 3]], np.int32)
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
    _, cache = apply(emb, pos, seg, prompt_len + new, dropped, prompt_len - 6, method="prefill")
    cache = Llama.stacked(cache) if method == "decode_in_place" else cache
    steps = []
    for i in range(new):
        logits, cache = apply(tokens[:, i:i + 1], cache, method=method)
        steps.append(np.asarray(logits[:, 0]))
    full_emb = np.concatenate([emb, np.asarray(apply(tokens, method="embed"))], axis=1)
    full_pos = np.tile(np.arange(prompt_len + new), (2, 1))
    full = np.asarray(apply(full_emb, full_pos, np.ones((2, prompt_len + new), np.int32),
                            np.pad(dropped, ((0, 0), (0, new))), prompt_len + new - 6))
    np.testing.assert_allclose(np.stack(steps, 1), full[:, prompt_len:], rtol=1e-5, atol=1e-5)
    last, _ = apply(emb, pos, seg, prompt_len, dropped, prompt_len - 6, last_only=True,
                    method="prefill")  # the last prompt token's logits alone
    np.testing.assert_allclose(last[:, 0], full[:, prompt_len - 1], rtol=1e-5, atol=1e-5)
