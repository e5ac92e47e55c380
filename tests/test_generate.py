import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params, tiny_config
from mqt_jax import splice
from mqt_jax.generate import cut_at_eos, greedy, prompt_batch
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel

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
    for _ in range(steps):
        batch = prompt_batch(examples, images, m, num_queries, seq_len=64)
        logits = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS))
        last = (batch["segment_ids"] > 0).sum(1) - 1
        nxt = np.asarray(jnp.argmax(logits[np.arange(len(examples)), last], -1))
        for i, t in enumerate(nxt):
            out[i].append(int(t))
            e = examples[i]
            examples[i] = splice.Example(list(e.tokens) + [int(t)], list(e.labels) + [splice.IGNORE])
    return np.array(out)


@pytest.mark.parametrize("m", [1, 16])
def test_cached_greedy_equals_recomputing_the_whole_sequence(m):
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 9, 6])  # rows of different lengths
    batch = prompt_batch(examples, images, m, cfg.num_queries, seq_len=40)
    params = varied(init_params(model, batch, method="logits"))
    # eos_id = -1: never produced, so all 6 steps run and every token is compared.
    got = np.asarray(greedy(model, params, batch, -1, max_new_tokens=6))
    want = recompute_greedy(model, params, examples, images, m, cfg.num_queries, 6)
    np.testing.assert_array_equal(got, want)
    assert len(set(got.ravel().tolist())) > 2  # not a degenerate constant output


def test_prefill_logits_equal_the_training_forward():
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [7, 3])
    batch = prompt_batch(examples, images, 6, cfg.num_queries, seq_len=32)
    params = init_params(model, batch, method="logits")
    full = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS))
    pre, cache = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), 40,
                             method="prefill")
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(np.asarray(pre)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)
    assert cache["k"].shape == (cfg.llm.num_layers, 2, 40, cfg.llm.num_kv_heads, cfg.llm.head_dim)
    np.testing.assert_array_equal(np.asarray(cache["index"][0]), real.sum(1))


def test_stops_at_eos_and_cuts():
    assert cut_at_eos(np.array([[5, 2, 7], [4, 4, 4]]), 2) == [[5], [4, 4, 4]]
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    examples, images = prompts(cfg, [4, 5])
    batch = prompt_batch(examples, images, 3, cfg.num_queries, seq_len=32)
    params = init_params(model, batch, method="logits")
    free = np.asarray(greedy(model, params, batch, -1, max_new_tokens=6))
    eos = int(free[0, 1])  # pretend row 0's second token is EOS
    got = np.asarray(greedy(model, params, batch, eos, max_new_tokens=6))
    assert got[0, 1] == eos and (got[0, 2:] == eos).all()  # padded with EOS after it
    row1 = free[1].tolist()
    cut = row1.index(eos) if eos in row1 else len(row1)
    np.testing.assert_array_equal(got[1, :cut], free[1, :cut])


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
