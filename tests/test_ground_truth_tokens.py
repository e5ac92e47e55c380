import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_script

from mqt_jax.data.shapes import COLOURS, SHAPES
from mqt_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from mqt_jax.models.llama import Llama

gt = load_script("ground_truth_tokens")


def tokenizer(tmp_path):
    words = list(COLOURS) + list(SHAPES) + ["yes", "no", "How many shapes are there?",
                                            "What colour is the shape in row 1, column 2?"]
    train_sentencepiece([" ".join(words)] * 50 + [str(i) for i in range(10)] * 20, tmp_path, 400)
    return load_tokenizer(tmp_path)


def test_the_targets_are_the_answer_and_the_cells_are_the_scene(tmp_path):
    tok = tokenizer(tmp_path)
    batch = gt.make_batch(tok, range(40), 9, types=("count",))
    for tokens, weights, cells in zip(batch["tokens"], batch["weights"], batch["cells"]):
        target = np.roll(tokens, -1)[weights > 0]
        assert target[-1] == tok.eos_id
        count = int(tok.decode(target[:-1]))
        assert count == (cells[:, 0] > 0).sum() >= 1  # the answer counts the non-empty cells
        assert ((cells > 0).all(1) | (cells == 0).all(1)).all()


def test_one_pooled_token_is_the_compact_sequence(tmp_path):
    """m = 1: the text's logits equal the LLM run on [mean of the 9 cell tokens, text] alone."""
    tok = tokenizer(tmp_path)
    cfg = dataclasses.replace(gt.TINY, hidden=32, num_heads=2, num_kv_heads=1, head_dim=16,
                              mlp_dim=64, num_layers=2)
    llm = Llama(cfg, remat_policy="none")
    width = gt.CELLS + gt.LENGTH
    params = {"llm": llm.init(jax.random.PRNGKey(0), jnp.zeros((1, width, 32)),
                              jnp.zeros((1, width), jnp.int32), jnp.ones((1, width), jnp.int32))["params"],
              "cells": jax.random.normal(jax.random.PRNGKey(1), (3, 8, 32))}
    batch = gt.make_batch(tok, range(3), 1)
    got = np.asarray(gt.logits(llm, params, batch))
    table = np.asarray(params["cells"])
    for i in range(3):
        c = batch["cells"][i]
        pooled = (table[0][c[:, 0]] + table[1][c[:, 1]] + table[2][c[:, 2]]).mean(0)
        text = np.asarray(llm.apply({"params": params["llm"]}, batch["tokens"][i:i + 1], method=llm.embed))[0]
        x = np.concatenate([pooled[None], text])[None]
        positions = np.arange(1 + gt.LENGTH)[None]
        want = np.asarray(llm.apply({"params": params["llm"]}, x, positions, np.ones_like(positions)))[0, 1:]
        np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_a_missing_llm_run_is_a_one_line_error(tmp_path):
    like = {"embedding": jnp.zeros((4, 2))}
    with pytest.raises(SystemExit, match="--llm .*no checkpoint"):
        gt.pretrained_llm(str(tmp_path), like)
