"""The cost of one graph for every m: a stage-2 loss-and-gradient pass with m drawn per
example, laid out as the pipeline does (one compiled shape), against the really truncated
computation of the same examples at the same m, printed as a table.

    python scripts/one_graph_cost.py [--model tiny|76m] [--examples 32] [--repeats 3]

Examples: one image and a text of 48..224 tokens each (uniform), m per example from
MQT's official sampler (even 2..M, M = 64), trained parts the query transformer and the LLM
(the tower frozen, as in stage 2), float32. Three ways over the same examples, 8 rows a batch:
- truncated: each batch computes only n = its largest m queries (the resampler really
  truncated), rows carry their own m and the sequence is the batch's longest row (rounded up
  to 8): a compile per distinct shape (not timed), the least work a batched step can do;
- one graph, unpacked: the pipeline's layout, one example per row, every row seq_len = 320,
  all M queries computed, m as data: one compile for every batch;
- one graph, packed: the same, examples packed first-fit by their true length (text + m)
  into rows of 320 (`DataConfig.pack`), so the same examples take fewer rows and batches.
Seconds are the sum over the batches of each batch's median pass (a last, partly filled
batch counted by its share of rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_step import model_config  # scripts/train_step.py: the same tiny / 76M models

from mqt_jax.config import MSampler
from mqt_jax.core import splice
from mqt_jax.core.outputs import markdown_table
from mqt_jax.models.loss import cross_entropy
from mqt_jax.models.vlm import VisionLanguageModel

ROWS, SEQ = 8, 320


def examples(cfg, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        question = rng.integers(3, cfg.llm.vocab_size, size=int(rng.integers(16, 64))).tolist()
        answer = rng.integers(3, cfg.llm.vocab_size, size=int(rng.integers(32, 161))).tolist()
        tokens = [1, splice.IMAGE_TOKEN] + question + answer
        out.append(splice.Example(tokens, [splice.IGNORE] * (2 + len(question)) + answer))
    m = MSampler("official").sample(cfg.num_queries, (n,), seed, 1)
    images = rng.normal(size=(n, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return out, m, images


def batch_of(rows, m_of, exs, images, num_queries, seq_len):
    """rows: lists of example indices (each example one image slot of its row)."""
    slots = max(len(r) for r in rows)
    m = np.ones((len(rows), slots), np.int32)
    pixels = np.zeros((len(rows), slots) + images.shape[1:], np.float32)
    for r, row in enumerate(rows):
        for k, e in enumerate(row):
            m[r, k], pixels[r, k] = m_of[e], images[e]
    return {"images": pixels, "m": m, **splice.layout_rows(
        [[exs[e] for e in row] for row in rows], m, num_queries, seq_len)}


def packed_rows(exs, m, seq_len):
    rows, lengths = [], []
    for e, ex in enumerate(exs):
        length = splice.true_length(ex, m[e:e + 1])
        k = next((k for k, used in enumerate(lengths) if used + length <= seq_len), None)
        if k is None:
            rows.append([e])
            lengths.append(length)
        else:
            rows[k].append(e)
            lengths[k] += length
    return rows


def seconds(fn, params, batch, repeats: int) -> float:
    jax.block_until_ready(fn(params, batch))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "76m"])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = model_config(args.model)
    model, big_m = VisionLanguageModel(cfg), cfg.num_queries
    exs, m, images = examples(cfg, args.examples)
    init_batch = batch_of([[0]], m, exs, images, big_m, SEQ)
    params = jax.jit(model.init, static_argnames="method")(jax.random.key(0), init_batch,
                                                           method="logits")["params"]
    trained = {k: v for k, v in params.items() if k != "vision_tower"}

    def loss(trainable, tower, batch, n=None):
        p = {**trainable, "vision_tower": tower}
        if n is None:
            logits = model.apply({"params": p}, batch, method="logits")
        else:
            logits = model.apply({"params": p}, batch, n, method=truncated_logits)
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=3)
    one_graph = lambda p, b: grad(p, params["vision_tower"], b)  # noqa: E731
    total = {"truncated": 0.0, "one graph, unpacked": 0.0, "one graph, packed": 0.0}
    rows_used = dict.fromkeys(total, 0)
    padding = {k: [] for k in total}
    for start in range(0, args.examples, ROWS):
        chunk = list(range(start, min(start + ROWS, args.examples)))
        n = int(m[chunk].max())
        longest = max(splice.true_length(exs[e], m[e:e + 1]) for e in chunk)
        b = batch_of([[e] for e in chunk], m, exs, images, n, -(-longest // 8) * 8)
        total["truncated"] += seconds(lambda p, x, n=n: grad(p, params["vision_tower"], x, n),
                                      trained, b, args.repeats)
        rows_used["truncated"] += len(chunk)
        padding["truncated"].append(np.mean(b["segment_ids"] == 0))
        b = batch_of([[e] for e in chunk] + [[chunk[0]]] * (ROWS - len(chunk)), m, exs, images,
                     big_m, SEQ)
        share = len(chunk) / ROWS
        total["one graph, unpacked"] += share * seconds(one_graph, trained, b, args.repeats)
        rows_used["one graph, unpacked"] += len(chunk)
        padding["one graph, unpacked"].append(np.mean(b["segment_ids"][:len(chunk)] == 0))
    packed = packed_rows(exs, m, SEQ)
    for start in range(0, len(packed), ROWS):
        rows = packed[start:start + ROWS]
        b = batch_of(rows + [[rows[0][0]]] * (ROWS - len(rows)), m, exs, images, big_m, SEQ)
        # A last, partly filled batch counts its share: a stream of examples fills every batch.
        share = len(rows) / ROWS
        total["one graph, packed"] += share * seconds(one_graph, trained, b, args.repeats)
        rows_used["one graph, packed"] += len(rows)
        padding["one graph, packed"].append(np.mean(b["segment_ids"][:len(rows)] == 0))
    base = total["truncated"]
    print(f"{args.examples} examples, m from the official sampler (M = {big_m}), model {args.model}, "
          f"{jax.devices()[0].device_kind}\n")
    print(markdown_table(
        ["layout", "rows", "padding", "seconds", "s / example", "cost vs truncated"],
        [[name, rows_used[name], f"{np.mean(padding[name]):.1%}", f"{s:.2f}",
          f"{s / args.examples:.3f}", f"{s / base:.2f}x"] for name, s in total.items()]))


def truncated_logits(mdl, batch, n: int):
    """The really truncated forward: only n queries computed; rows laid out at num_queries=n."""
    b, i = batch["m"].shape
    text = mdl.llm.embed(batch["token_ids"])
    images = batch["images"].reshape((b * i,) + batch["images"].shape[2:])
    tokens = mdl.visual_tokens(images, None, n).reshape(b, i * n, -1)
    x = splice.splice(text, tokens, batch["visual_index"])
    return mdl.llm(x, batch["positions"], batch["segment_ids"])


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
