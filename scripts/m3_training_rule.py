"""M3's training rule against MQT's: the cost of training every example at every scale.

    python scripts/m3_training_rule.py [--shapes data/shapes] [--steps 10]

The default recipe's stage 2 (tiny model, the m3 compressor, batch 8 x 320 packed) on
shapes-VQA with MSampler "fixed_set" (one scale drawn per example, MQT's rule) and "all"
(each example at scales 1, 4, 16 and 64 in the same step, the loss their mean, M3's rule).
Both run the same compiled step (same shapes), so the step time is the same; what differs is
how many examples a step trains. Prints a table: examples and scale-copies per step, padding,
seconds per step and per example, and the per-example cost relative to one scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from mqt_jax.config import MeshConfig

SCALES = (1, 4, 16, 64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="data/shapes",
                        help="a shapes-VQA folder (generated, small, into a temporary one if absent)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import jax

    from mqt_jax.config import DataConfig, ModelConfig, MSampler, TrainConfig
    from mqt_jax.core import sharding
    from mqt_jax.core.gin_files import parse_gin
    from mqt_jax.core.outputs import markdown_table
    from mqt_jax.data.pipeline import make_batches
    from mqt_jax.data.shapes import write_shapes
    from mqt_jax.training.recipe import scoped
    from mqt_jax.training.trainer import Trainer

    shapes = Path(args.shapes)
    if not (shapes / "shapes_qa.json").exists():
        shapes = write_shapes(Path(tempfile.mkdtemp()) / "shapes", num_train=400, num_eval=1,
                              tfds=False)
    parse_gin(["tiny_two_stage.gin"], ['QueryTransformerConfig.variant = "m3"'])
    with scoped("stage2"):
        model_config, config, data = ModelConfig(), TrainConfig(), DataConfig()
    data = dataclasses.replace(data, data_path=str(shapes / "shapes_qa.json"),
                               image_root=str(shapes / "images"),
                               tokenizer_dir=str(shapes / "tokenizer"))
    mesh = sharding.make_mesh(MeshConfig())
    rows = []
    for rule, name in (("fixed_set", "one scale drawn per example (MQT's rule)"),
                       ("all", "every scale per example (M3's rule)")):
        sampler = MSampler(rule, values=SCALES)
        trainer = Trainer(model_config, config, mesh, sampler)
        state = trainer.init_state()
        batches = make_batches(data, num_queries=model_config.num_queries,
                               image_size=model_config.vision.image_size,
                               batch_size=config.batch_size, seq_len=config.seq_len,
                               images_per_row=config.images_per_row, sampler=sampler,
                               seed=config.seed)
        for _ in range(2):  # compile and warm up
            state, metrics = trainer.step(state, next(batches))
        jax.block_until_ready(metrics["loss"])
        copies, padding, seconds = 0, [], 0.0
        for _ in range(args.steps):
            batch = next(batches)
            copies += int(sum(len(set(r[r > 0].tolist())) for r in batch["segment_ids"]))
            padding.append(float(np.mean(batch["segment_ids"] == 0)))
            start = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics["loss"])
            seconds += time.perf_counter() - start
        examples = copies / sampler.copies(model_config.num_queries)
        rows.append((name, examples / args.steps, copies / args.steps, np.mean(padding),
                     seconds / args.steps, seconds / examples))
        print(f"{name}: {rows[-1][1]:.1f} examples / step, {rows[-1][4]:.2f} s / step", flush=True)
    base = rows[0][5]
    print("\n" + markdown_table(
        ["rule", "examples / step", "scale-copies / step", "padding", "s / step",
         "s / example", "cost per example"],
        [[name, f"{ex:.1f}", f"{cp:.1f}", f"{pad:.1%}", f"{step:.2f}", f"{per:.3f}",
          f"{per / base:.2f}x"] for name, ex, cp, pad, step, per in rows]))


if __name__ == "__main__":
    main()
