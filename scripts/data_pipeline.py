"""Examples per second through the whole input pipeline (decode, CLIP preprocess, tokenize,
m sampling, packing, layout), and the fraction of padding tokens, printed as a table.

    python scripts/data_pipeline.py [--batches 30] [--out /tmp/bench_data]

Datasets: shapes-VQA at 64 px (PNG, the tiny config) and the same scenes as 336 x 336 JPEGs
(the 7B config's resolution, M = 256).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from mqt_jax.config import DataConfig, MSampler
from mqt_jax.core.outputs import markdown_table
from mqt_jax.data.pipeline import make_batches
from mqt_jax.data.shapes import draw, random_scene, write_shapes


def jpeg_copy(shapes: Path, out: Path, size: int = 336) -> Path:
    """The shapes-VQA QA records with each image redrawn at size x size and saved as JPEG."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = json.loads((shapes / "shapes_qa.json").read_text())
    for i, record in enumerate(records):
        name = f"{i:06d}.jpg"
        draw(random_scene(np.random.default_rng([0, i])), size).save(out / "images" / name, quality=90)
        record["image"] = name
    (out / "shapes_qa.json").write_text(json.dumps(records))
    return out


def measure(config: DataConfig, *, image_size: int, num_queries: int, seq_len: int,
            batches: int, batch_size: int = 8) -> tuple[float, float]:
    it = make_batches(config, num_queries=num_queries, image_size=image_size,
                      batch_size=batch_size, seq_len=seq_len,
                      images_per_row=4 if config.pack else 1,  # unpacked rows hold one example
                      sampler=MSampler("official"))
    for _ in range(2):  # warm up: worker start-up, tokenizer load
        next(it)
    examples, padding, start = 0, [], time.perf_counter()
    for _ in range(batches):
        b = next(it)
        examples += int(sum(len(set(row[row > 0].tolist())) for row in b["segment_ids"]))
        padding.append(float(np.mean(b["segment_ids"] == 0)))
    return examples / (time.perf_counter() - start), float(np.mean(padding))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--out", default="/tmp/mqt_bench_data")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shapes = write_shapes(out / "shapes", num_train=400, num_eval=1, tfds=False)
    jpegs = jpeg_copy(shapes, out / "jpeg336")
    rows = []
    for name, root, data, size, m, template, seq_len in [
        ("shapes 64px PNG, captions", shapes / "images", shapes / "shapes_captions.json", 64, 64, "plain", 256),
        ("shapes 64px PNG, QA", shapes / "images", shapes / "shapes_qa.json", 64, 64, "vicuna_v1", 512),
        ("336px JPEG, QA", jpegs / "images", jpegs / "shapes_qa.json", 336, 256, "vicuna_v1", 1024),
    ]:
        for workers in (0, 2):
            for pack in (False, True):
                config = DataConfig(data_path=str(data), image_root=str(root),
                                    tokenizer_dir=str(shapes / "tokenizer"), template=template,
                                    pack=pack, num_workers=workers)
                rate, pad = measure(config, image_size=size, num_queries=m, seq_len=seq_len,
                                    batches=args.batches)
                rows.append((name, workers, pack, seq_len, rate, pad))
                print(f"{name:28s} workers={workers} pack={pack!s:5s} {rate:8.1f} examples/s  "
                      f"padding {pad:.1%}", flush=True)
    print("\n" + markdown_table(
        ["data", "workers", "packing", "seq_len", "examples/s", "padding"],
        [[name, workers, "yes" if pack else "no", seq_len, f"{rate:.0f}", f"{pad:.1%}"]
         for name, workers, pack, seq_len, rate, pad in rows]))


if __name__ == "__main__":
    main()
