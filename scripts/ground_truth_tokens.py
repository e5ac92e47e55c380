"""Can the tiny LLM learn to read the visual tokens at all? A diagnostic with perfect tokens.

    python scripts/ground_truth_tokens.py [--data data/shapes] [--steps 1000] [--batch 64]
    python scripts/ground_truth_tokens.py --tokens tower [--local_init 16] [--compressor RUN]

`--tokens` picks what the LLM reads before the question:
- `cells` (the default): no tower, no compressor: each of the 3 x 3 cells is one token, the
  sum of three learned embeddings (colour, kind, size; a fourth for an empty cell), and
  "m = 1" is their mean, one token that still holds every count linearly;
- `cells64`: the same cell tokens, each of the 8 x 8 patches showing its cell's;
- `patches`: each 8 x 8 patch of the drawn scene as one token, a learned linear map of its
  pixels;
- `tower`: the real visual tokens: DATA/pretrained/clip's tower (frozen, or trained with
  `--train_tower`), configs/tiny.gin's compressor (from `--compressor RUN`'s, or fresh with
  `--local_init`).
With 64 tokens, m is drawn per question from 1, 2, 4, ..., 64 (`--train_m` sets the list) and
scored at 1, 4, 16 and 64. The LLM (configs/tiny.gin's shape, from scratch; `--llm RUN`
starts it from a run's) sees the first m tokens, then a shapes-VQA question, and learns the
answer (loss on the answer's tokens only; fresh scenes every step, none of any split). Every
100 steps it prints exact-match accuracy per question type per scored m on 600 scenes it
never trains on. `--visual_lr` scales the visual side's learning rate (0: frozen); `--scale`
multiplies the cell tokens.

What it tells: how many steps (of `--batch` questions) the 4-layer LLM needs to learn each
kind of question from each kind of token, with endless data and a bare conversation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mqt_jax.config import LLMConfig
from mqt_jax.data.preprocess import clip_preprocess
from mqt_jax.data.shapes import COLOURS, QUESTION_TYPES, SHAPES, SIZES, draw, questions, random_scene
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.models.llama import Llama

CELLS = 9
LENGTH = 24  # question + answer tokens (the longest shapes question and answer: 16)
TINY = LLMConfig(vocab_size=512, hidden=256, num_layers=4, num_heads=8, num_kv_heads=4,
                 head_dim=32, mlp_dim=688)
HELD_OUT = 10_000_000  # scene seeds from here on are scored, never trained on


def cell_labels(shapes) -> np.ndarray:
    """[9, 3] ints: each cell's colour, kind, size (1-based), or 0, 0, 0 when empty."""
    labels = np.zeros((CELLS, 3), np.int32)
    for s in shapes:
        labels[(s.row - 1) * 3 + s.col - 1] = (1 + list(COLOURS).index(s.colour),
                                               1 + SHAPES.index(s.kind), 1 + SIZES.index(s.size))
    return labels


def make_batch(tokenizer, seeds, m, types=QUESTION_TYPES, image_size: int = 0) -> dict:
    """One question of a random type per scene; `weights` mark the answer's tokens (and EOS)
    as the targets of the position before each. `image_size` > 0: the scenes drawn too
    (`images`, CLIP-normalised)."""
    out = {"cells": [], "tokens": [], "weights": [], "type": []} | (
        {"images": []} if image_size else {})
    for seed in seeds:
        rng = np.random.default_rng([7, seed])
        shapes = random_scene(rng)
        qas = questions(shapes, rng, types)
        k = int(rng.integers(len(qas)))
        question = tokenizer.encode(qas[k][0])[0]
        answer = np.append(tokenizer.encode(" " + qas[k][1])[0], tokenizer.eos_id)
        tokens, weights = np.zeros(LENGTH, np.int32), np.zeros(LENGTH, np.float32)
        seq = np.concatenate([question, answer])
        if len(seq) > LENGTH:
            raise ValueError(f"a question and answer of {len(seq)} tokens: at most {LENGTH}")
        tokens[:len(seq)] = seq
        weights[len(question) - 1:len(seq) - 1] = 1
        for key, value in (("cells", cell_labels(shapes)), ("tokens", tokens),
                           ("weights", weights), ("type", k)):
            out[key].append(value)
        if image_size:
            out["images"].append(clip_preprocess(draw(shapes, image_size), image_size))
    batch = {k: np.stack(v) for k, v in out.items()}
    batch["m"] = np.broadcast_to(np.asarray(m), (len(seeds),)).astype(np.int32)
    return batch


def visual_tokens(table, cells, m, scale: float = 1.0):
    """[B, 9, hidden]: one token per cell, or (m == 1) their mean in slot 0 and padding after;
    `scale` x the learned embeddings (whose RMS starts at 0.02, as the text embeddings')."""
    tokens = scale * (table[0][cells[..., 0]] + table[1][cells[..., 1]] + table[2][cells[..., 2]])
    pooled = jnp.zeros_like(tokens).at[:, 0].set(tokens.mean(1))
    return jnp.where((m == 1)[:, None, None], pooled, tokens)


def logits(llm, params, batch, scale: float = 1.0, tower=None):
    """The text positions' logits after the visual tokens (cells, or with `tower` the real
    ones); the visual slots past the used ones are a segment apart, and the text's positions
    follow the used ones."""
    m = batch["m"]
    if tower is None:
        visual, used = visual_tokens(params["cells"], batch["cells"], m, scale), jnp.where(m == 1, 1, CELLS)
    else:
        visual, used = tower.tokens(params, batch.get("images", batch["cells"]), m), m
    slots = visual.shape[1]
    text = llm.apply({"params": params["llm"]}, batch["tokens"], method=llm.embed)
    x = jnp.concatenate([visual, text], 1)
    used, index = used[:, None], jnp.arange(x.shape[1])[None]
    positions = jnp.where(index < slots, index, index - slots + used)
    segments = jnp.where((index < used) | (index >= slots), 1, 2)
    return llm.apply({"params": params["llm"]}, x, positions, segments)[:, slots:]


class Patches:
    """`--tokens patches`: no tower, no compressor: each 8 x 8 patch of the drawn scene is one
    token, a learned linear map of its pixels (64 tokens in raster order, the first m read)."""

    image_size, patch, num_queries = 64, 8, 64

    def __init__(self):
        self.init = {"patches": 0.02 * jax.random.normal(jax.random.PRNGKey(3), (3 * self.patch**2, TINY.hidden))}

    def tokens(self, params, images, m):
        n, g = images.shape[0], self.image_size // self.patch
        x = images.reshape(n, g, self.patch, g, self.patch, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, g * g, -1) @ params["patches"]


class SpreadCells:
    """`--tokens cells64`: the perfect cell tokens, each patch of the 8 x 8 grid showing its
    cell's (64 tokens in raster order, the first m read): what `patches` could learn, without
    the pixels."""

    image_size, num_queries = 0, 64
    cell_of_patch = np.array([(r * 3 // 8) * 3 + c * 3 // 8 for r in range(8) for c in range(8)])

    def __init__(self):
        self.init = {"cells": 0.02 * jax.random.normal(jax.random.PRNGKey(4), (3, 8, TINY.hidden))}

    def tokens(self, params, cells, m):
        table = params["cells"]
        per_cell = table[0][cells[..., 0]] + table[1][cells[..., 1]] + table[2][cells[..., 2]]
        return per_cell[:, self.cell_of_patch]


class Tower:
    """configs/tiny.gin's vision tower (frozen, from a CLIP run) and compressor (trained):
    `tokens` gives all M visual tokens of CLIP-normalised images, the first m meant."""

    def __init__(self, clip_run: str, local_init: float = 0.0, compressor_run: str = "",
                 train_tower: bool = False, teach: int = 0, tokenizer=None):
        import gin

        from mqt_jax.config import ModelConfig
        from mqt_jax.core import splice
        from mqt_jax.models.vlm import VisionLanguageModel

        gin.parse_config_files_and_bindings(
            [str(Path(__file__).parent.parent / "configs" / "tiny.gin")],
            [f"QueryTransformerConfig.local_init = {local_init}"])
        self.config = ModelConfig()
        if self.config.llm.hidden != TINY.hidden:
            raise SystemExit(f"configs/tiny.gin's LLM is {self.config.llm.hidden} wide; this "
                             f"script's is {TINY.hidden}")
        self.model = VisionLanguageModel(self.config)
        batch = splice.placeholder_batch(1, 8, 1, self.config.vision.image_size)
        params = self.model.init(jax.random.PRNGKey(2), batch, method="logits")["params"]
        params = nn.meta.unbox(self.config.compressor.initialized(params, self.config.query))
        tower = restored(clip_run, {"vision_tower": params["vision_tower"]}, "--clip")
        if teach:
            tower = {"vision_tower": self.taught(tower["vision_tower"], teach, tokenizer)}
        self.init = {"query_transformer": params["query_transformer"]}
        if compressor_run:
            self.init = restored(compressor_run, self.init, "--compressor")
        self.frozen = {} if train_tower else tower
        self.init |= tower if train_tower else {}
        self.num_queries = self.config.num_queries
        self.image_size = self.config.vision.image_size

    def features(self, tower, images):
        return self.model.apply({"params": {"vision_tower": tower}}, images,
                                method=lambda model, x: model.vision_tower(x))

    def taught(self, tower, steps: int, tokenizer, batch: int = 64):
        """The tower taught each cell's content first (`--teach_tower`): per cell, the mean of
        its patches' features through linear heads for colour, kind and size (0: empty),
        cross-entropy on fresh scenes. A stand-in for a vision encoder that already knows
        objects, as CLIP ViT-L does and the 150-step mini-CLIP does not."""
        spread = jax.nn.one_hot(SpreadCells.cell_of_patch, CELLS)
        spread = spread / spread.sum(0)
        width = self.config.vision.width
        params = {"tower": tower, "w": 0.02 * jax.random.normal(jax.random.PRNGKey(5), (3, width, 8)),
                  "b": jnp.zeros((3, 8))}
        optimizer = optax.adamw(1e-3, weight_decay=0.0)

        def loss_fn(p, images, cells):
            per_cell = jnp.einsum("bpw,pc->bcw", self.features(p["tower"], images), spread)
            logits = jnp.einsum("bcw,kwn->bckn", per_cell, p["w"]) + p["b"]
            right = (logits.argmax(-1) == cells).mean()
            return optax.softmax_cross_entropy_with_integer_labels(logits, cells).mean(), right

        @jax.jit
        def step(p, state, images, cells):
            (loss, right), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, images, cells)
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss, right

        state = optimizer.init(params)
        for k in range(steps):
            b = make_batch(tokenizer, range(HELD_OUT // 2 + k * batch, HELD_OUT // 2 + (k + 1) * batch),
                           CELLS, image_size=self.config.vision.image_size)
            params, state, loss, right = step(params, state, b["images"], b["cells"])
        print(json.dumps({"taught_tower_steps": steps, "loss": round(float(loss), 3),
                          "cell_attributes_right": round(100 * float(right), 1)}), flush=True)
        return params["tower"]

    def tokens(self, params, images, m):
        both = {"vision_tower": {**self.frozen, **params}["vision_tower"],
                "query_transformer": params["query_transformer"]}
        return self.model.apply({"params": both}, images, m, method="visual_tokens")


def restored(run: str, like: dict, flag: str) -> dict:
    """The parameters of a run under `like`'s top-level names (shaped like it), on one
    device; a run that lacks them is a one-line error naming `flag`."""
    from mqt_jax.core.checkpoint import restore_params

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            nn.meta.unbox(like))
    try:
        return restore_params(run, abstract, only=tuple(f"{k}/.*" for k in like))[0]
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"{flag} {run}: {e}") from None


def pretrained_llm(run: str, like: dict) -> dict:
    """The LLM parameters of a run (shaped like `like`), on one device."""
    return restored(run, {"llm": like}, "--llm")["llm"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes", help="a shapes folder (its tokenizer)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--llm", default="",
                        help="start the LLM from this run's (e.g. DATA/pretrained/llm, stage 0's); "
                             "default: from scratch")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the cell tokens (300: RMS ~6, as a resampler's outputs)")
    parser.add_argument("--tokens", choices=("cells", "tower", "patches", "cells64"), default="cells",
                        help="perfect per-cell tokens, the real tower + compressor's, or a linear "
                             "map of each 8 x 8 patch")
    parser.add_argument("--clip", default="", help="tower: the CLIP run (default DATA/pretrained/clip)")
    parser.add_argument("--compressor", default="",
                        help="tower: start the compressor from this run's (e.g. a stage 1)")
    parser.add_argument("--local_init", type=float, default=0.0,
                        help="tower: a fresh compressor's QueryTransformerConfig.local_init")
    parser.add_argument("--visual_lr", type=float, default=1.0,
                        help="the visual side's learning rate as a multiple of the LLM's (0: frozen)")
    parser.add_argument("--train_m", default="",
                        help="the m drawn in training, e.g. 64 or 1,64 (default: 1, 9 for cells; "
                             "1, 2, 4, ..., M otherwise)")
    parser.add_argument("--teach_tower", type=int, default=0,
                        help="tower: first teach it each cell's content for this many steps")
    parser.add_argument("--train_tower", action="store_true",
                        help="tower: train the vision tower too (default: frozen)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        raise SystemExit(f"--steps {args.steps} and --batch {args.batch} must be >= 1")
    try:
        tokenizer = load_tokenizer(f"{args.data}/tokenizer")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--data {args.data}: {e}") from None
    if tokenizer.vocab_size > TINY.vocab_size:
        raise SystemExit(f"--data {args.data}: a tokenizer of {tokenizer.vocab_size} tokens; the "
                         f"tiny LLM has {TINY.vocab_size} (a shapes folder's own tokenizer fits)")
    llm = Llama(TINY, remat_policy="none")
    init, table = jax.random.split(jax.random.PRNGKey(0))
    width = CELLS + LENGTH
    params = {"llm": llm.init(init, jnp.zeros((1, width, TINY.hidden)), jnp.zeros((1, width), jnp.int32),
                              jnp.ones((1, width), jnp.int32))["params"]}
    tower, image_size = None, 0
    if args.tokens in ("tower", "patches", "cells64"):
        tower = {"patches": Patches, "cells64": SpreadCells}.get(args.tokens, lambda: Tower(
            args.clip or f"{args.data}/pretrained/clip", args.local_init, args.compressor,
            args.train_tower, args.teach_tower, tokenizer))()
        params |= tower.init
        image_size, top = tower.image_size, tower.num_queries
        trained_m = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < top] + [top]
        scored_m = sorted({1, min(4, top), min(16, top), top})
    else:
        params["cells"] = 0.02 * jax.random.normal(table, (3, 8, TINY.hidden))
        trained_m = scored_m = [1, CELLS]
    if args.train_m:
        try:
            trained_m = [int(k) for k in args.train_m.split(",")]
        except ValueError:
            raise SystemExit(f"--train_m {args.train_m!r}: integers, e.g. 1,64") from None
        if not all(1 <= k <= max(scored_m) for k in trained_m):
            raise SystemExit(f"--train_m {args.train_m}: each in [1, {max(scored_m)}]")
    if args.llm:
        params["llm"] = pretrained_llm(args.llm, params["llm"])
    warmup = min(30, max(1, args.steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(0, args.learning_rate, warmup,
                                                  max(args.steps, warmup + 1))
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        logp = jax.nn.log_softmax(logits(llm, params, batch, args.scale, tower))
        target = jnp.roll(batch["tokens"], -1, axis=1)
        nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
        return (nll * batch["weights"]).sum() / batch["weights"].sum()

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = {k: u if k == "llm" else jax.tree.map(lambda x: args.visual_lr * x, u)
                   for k, u in updates.items()}
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def exact(params, batch):
        target = jnp.roll(batch["tokens"], -1, axis=1)
        right = (logits(llm, params, batch, args.scale, tower).argmax(-1) == target) | (batch["weights"] == 0)
        return right.all(1)

    scored = {m: [make_batch(tokenizer, range(HELD_OUT + 200 * i, HELD_OUT + 200 * (i + 1)), m,
                             image_size=image_size) for i in range(3)] for m in scored_m}
    rng, start = np.random.default_rng(1), time.time()
    for step in range(1, args.steps + 1):
        batch = make_batch(tokenizer, range(step * args.batch, (step + 1) * args.batch),
                           rng.choice(trained_m, args.batch), image_size=image_size)
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % 100 and step != args.steps:
            continue
        row = {"step": step, "seconds": round(time.time() - start), "loss": round(float(loss), 3)}
        for m, batches in scored.items():
            right = np.concatenate([np.asarray(exact(params, b)) for b in batches])
            kinds = np.concatenate([b["type"] for b in batches])
            row[f"m={m}"] = {t: round(100 * right[kinds == k].mean(), 1)
                             for k, t in enumerate(QUESTION_TYPES)} | {"all": round(100 * right.mean(), 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
