"""An m-sweep (every question answered at every m, as `mqt-jax eval` does) with the visual
tokens computed once per image against once per image and m; prints a Markdown table.

    python scripts/m_sweep.py [--configs tiny,mid] [--images 32] [--new_tokens 4]

Models: inference_latency.py's "tiny" (64 px, M = 64) and "mid" (224 px, M = 256, a 12 x 768
LLM), random weights (speed does not depend on training; serve_load.py's build_model), one question per random image,
m over 1, 2, 4, ..., M, greedy answers of --new_tokens tokens. Both sweeps run after a warm-up
sweep (compilation excluded) and must give the same answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import WORDS, build_model  # noqa: E402

from mqt_jax.config import SamplingConfig  # noqa: E402
from mqt_jax.core.outputs import markdown_table  # noqa: E402
from mqt_jax.data.conversation import encode_prompt  # noqa: E402
from mqt_jax.evaluation.evaluate import sweep_answers  # noqa: E402
from mqt_jax.inference.generate import Generator  # noqa: E402


def sweep(name: str, num_images: int, new_tokens: int) -> list[list[str]]:
    model = build_model(name)
    cfg, tokenizer, rng = model.config, model.tokenizer, np.random.default_rng(0)
    prompts = [encode_prompt(" ".join(rng.choice(WORDS, 12)) + "?", "vicuna_v1", tokenizer)
               for _ in range(num_images)]
    size = cfg.vision.image_size
    images = rng.normal(size=(num_images, size, size, 3)).astype(np.float32)
    m_values = [2**k for k in range(int(np.log2(cfg.num_queries)) + 1)]
    generator = Generator(cfg, model.params, model.mesh, tokenizer.eos_id,
                          SamplingConfig(temperature=0.0, max_new_tokens=new_tokens), batch_size=8)
    rows, answers = [], {}
    for reuse in (True, False):
        sweep_answers(generator, prompts[:8], images[:8], m_values, tokenizer, reuse=reuse)  # compile
        passes, start = generator.vision_passes, time.perf_counter()
        answers[reuse] = sweep_answers(generator, prompts, images, m_values, tokenizer, reuse=reuse)
        seconds = time.perf_counter() - start
        rows.append([name, "once per image" if reuse else "once per image and m",
                     str(len(m_values)), str(generator.vision_passes - passes), f"{seconds:.2f}"])
    if answers[True] != answers[False]:
        raise SystemExit(f"{name}: the two sweeps answered differently")
    rows[0].append(f"{float(rows[1][4]) / float(rows[0][4]):.2f}x")
    rows[1].append("1.00x")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=4)
    args = parser.parse_args()
    rows = [row for name in args.configs.split(",") for row in sweep(name, args.images, args.new_tokens)]
    print(f"m-sweep of {args.images} questions (one per image), {args.new_tokens} greedy tokens each\n")
    print(markdown_table(["model", "visual tokens computed", "m values", "vision passes",
                          "sweep (s)", "speed-up"], rows))


if __name__ == "__main__":
    main()
