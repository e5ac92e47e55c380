"""Prefill latency and decode tokens/s against m, next to the analytical FLOPs ratio, printed
as a table (Markdown; --out also writes JSON).

    python scripts/inference_latency.py [--configs tiny,mid] [--batch 8] [--repeats 3]

For each m the prefill (vision tower + query transformer + LLM over prompt and m visual
tokens) is timed on a batch of prompts laid out at m (bucketed lengths, so a smaller m is a
shorter sequence); decode tokens/s are the extra tokens over the extra time of generating
`--new_tokens` greedy tokens (no EOS) instead of one, so prefill and dispatch cancel.
"time / FLOPs" is (prefill time at m / at M) / (prefill FLOPs at m / at M): 1.0 means time
falls exactly as FLOPs do; above 1, fixed costs (dispatch, the vision tower, small matrices
that use the hardware poorly) keep small m from saving all it could.

Configs (random weights: timing does not depend on training): "tiny" is the default run's
model (configs/tiny.gin: 64 px, M = 64); "mid" a 224 px / M = 256 model with a 12-layer,
768-wide LLM, MQT-LLaVA's shape at about 1/40 of its LLM width x depth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gin
import jax
import numpy as np

from mqt_jax.config import (
    LLMConfig,
    MeshConfig,
    ModelConfig,
    QueryTransformerConfig,
    SamplingConfig,
    TrainConfig,
    VisionConfig,
)
from mqt_jax.core import flops, sharding, splice
from mqt_jax.core.gin_files import parse_gin
from mqt_jax.core.outputs import markdown_table
from mqt_jax.inference.generate import Generator
from mqt_jax.training.trainer import Trainer, merge_params


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        parse_gin(["tiny.gin"], [])
        config = ModelConfig()
        gin.clear_config()
        return config
    if name == "mid":
        return ModelConfig(
            vision=VisionConfig(image_size=224, patch_size=14, width=512, num_layers=8,
                                num_heads=8, mlp_dim=2048),
            query=QueryTransformerConfig(num_queries=256, width=512, num_heads=8),
            llm=LLMConfig(vocab_size=32000, hidden=768, num_layers=12, num_heads=12,
                          num_kv_heads=12, head_dim=64, mlp_dim=2048),
        )
    raise ValueError(f"config {name!r}: expected tiny or mid")


def requests(cfg: ModelConfig, n: int, text_tokens: int, seed: int = 0):
    """n prompts of `text_tokens` text tokens around one image slot, and their images."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        text = rng.integers(3, cfg.llm.vocab_size, size=text_tokens - 1).tolist()
        tokens = [1] + text[:8] + [splice.IMAGE_TOKEN] + text[8:]
        prompts.append(splice.Example(tokens, [splice.IGNORE] * len(tokens)))
    size = cfg.vision.image_size
    return prompts, rng.normal(size=(n, size, size, 3)).astype(np.float32)


def generation_seconds(generator: Generator, prompts, images, m: int, repeats: int) -> float:
    """Median wall time of generating for every prompt at m, after a call that compiles."""
    generator(prompts, images, m)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generator(prompts, images, m)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name: str, m_values: list[int], batch: int, text_tokens: int, new_tokens: int,
            repeats: int) -> list[dict]:
    cfg = model_config(name)
    mesh = sharding.make_mesh(MeshConfig())
    state = Trainer(cfg, TrainConfig(batch_size=batch), mesh).init_state(seed=0)
    params = merge_params(state.trainable, state.frozen)  # random, in training's shardings
    prompts, images = requests(cfg, batch, text_tokens)
    generators = {n: Generator(cfg, params, mesh, eos_id=-1, batch_size=batch, bucket=16,
                               sampling=SamplingConfig(max_new_tokens=n)) for n in (1, new_tokens)}
    rows, big_m = [], cfg.num_queries
    for m in [v for v in m_values if v <= big_m]:
        prefill = generators[1].prefill_seconds(prompts, images, m, repeats)
        seconds = {n: generation_seconds(g, prompts, images, m, repeats) for n, g in generators.items()}
        decode_s = max(seconds[new_tokens] - seconds[1], 1e-9)
        f = flops.inference_flops(cfg, m, text_tokens)
        rows.append({"config": name, "m": m, "prefill_ms": 1e3 * prefill,
                     "decode_tok_s": batch * (new_tokens - 1) / decode_s,
                     "prefill_gflops": batch * (f["total"] - f["llm_decode"]) / 1e9})
    at_big = rows[-1]
    for r in rows:
        r["time_ratio"] = r["prefill_ms"] / at_big["prefill_ms"]
        r["flops_ratio"] = r["prefill_gflops"] / at_big["prefill_gflops"]
        r["time_over_flops"] = r["time_ratio"] / r["flops_ratio"]
    return rows


def table(rows: list[dict]) -> str:
    cols = ["config", "m", "prefill_ms", "decode_tok_s", "prefill_gflops", "flops_ratio",
            "time_ratio", "time_over_flops"]
    return markdown_table(cols, [[r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.3g}"
                                  for c in cols] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--m", default="1,4,16,64,144,256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new_tokens {args.new_tokens}: at least 2 (decode is timed past the first)")
    m_values = [int(v) for v in args.m.split(",")]
    rows = []
    for name in args.configs.split(","):
        rows += measure(name, m_values, args.batch, args.text_tokens, args.new_tokens, args.repeats)
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind} ({device.platform}); batch {args.batch}, "
          f"{args.text_tokens} text tokens, {args.new_tokens} new tokens\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
