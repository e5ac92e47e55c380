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


class FixedTower:
    """A stand-in for Tower: the visual tokens are a parameter, whatever the images."""

    def tokens(self, params, images, m):
        return jnp.broadcast_to(params["visual"], (len(m),) + params["visual"].shape)


def test_the_first_m_tower_tokens_are_the_compact_sequence(tmp_path):
    """--tokens tower: with m = k the text's logits equal the LLM on [first k tokens, text]."""
    tok = tokenizer(tmp_path)
    cfg = dataclasses.replace(gt.TINY, hidden=32, num_heads=2, num_kv_heads=1, head_dim=16,
                              mlp_dim=64, num_layers=2)
    llm = Llama(cfg, remat_policy="none")
    width = 16 + gt.LENGTH
    params = {"llm": llm.init(jax.random.PRNGKey(0), jnp.zeros((1, width, 32)),
                              jnp.zeros((1, width), jnp.int32), jnp.ones((1, width), jnp.int32))["params"],
              "visual": jax.random.normal(jax.random.PRNGKey(1), (16, 32))}
    batch = gt.make_batch(tok, range(3), np.array([1, 5, 16]))
    got = np.asarray(gt.logits(llm, params, batch, tower=FixedTower()))
    for i, k in enumerate((1, 5, 16)):
        text = np.asarray(llm.apply({"params": params["llm"]}, batch["tokens"][i:i + 1], method=llm.embed))[0]
        x = np.concatenate([np.asarray(params["visual"])[:k], text])[None]
        positions = np.arange(k + gt.LENGTH)[None]
        want = np.asarray(llm.apply({"params": params["llm"]}, x, positions, np.ones_like(positions)))[0, k:]
        np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_the_drawn_images_are_the_scenes(tmp_path):
    """image_size > 0: each image's cell centres have the colour of that cell's shape, or white."""
    from mqt_jax.data.preprocess import CLIP_MEAN, CLIP_STD

    batch = gt.make_batch(tokenizer(tmp_path), range(20), 9, image_size=48)
    pixels = np.rint((batch["images"] * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255)
    colours = [(255, 255, 255)] + list(COLOURS.values())
    for image, cells in zip(pixels, batch["cells"]):
        for cell, (colour, _, _) in enumerate(cells):
            r, c = divmod(cell, 3)
            np.testing.assert_allclose(image[16 * r + 8, 16 * c + 8], colours[colour], atol=1)


def test_cells64_shows_each_patch_its_cell_and_patches_are_the_pixels(tmp_path):
    batch = gt.make_batch(tokenizer(tmp_path), range(4), 64, image_size=64)
    spread = gt.SpreadCells()
    got = np.asarray(spread.tokens(spread.init, batch["cells"], batch["m"]))
    table = np.asarray(spread.init["cells"])
    for i, cells in enumerate(batch["cells"]):
        for r, c in ((0, 0), (2, 5), (7, 7), (5, 2)):  # patch (r, c) lies in cell (3r // 8, 3c // 8)
            cell = cells[(3 * r // 8) * 3 + 3 * c // 8]
            want = table[0][cell[0]] + table[1][cell[1]] + table[2][cell[2]]
            np.testing.assert_allclose(got[i, 8 * r + c], want, rtol=1e-6)
    patches = gt.Patches()
    got = np.asarray(patches.tokens(patches.init, batch["images"], batch["m"]))
    w = np.asarray(patches.init["patches"])
    for r, c in ((0, 0), (3, 6)):
        pixels = batch["images"][:, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(4, -1)
        np.testing.assert_allclose(got[:, 8 * r + c], pixels @ w, rtol=1e-4, atol=1e-5)
