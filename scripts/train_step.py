"""One training step of the same MQT model in mqt_jax and in PyTorch, side by side, printed
as a table (Markdown; --out also writes JSON). torch and transformers are a benchmark-only
extra (`pip install torch transformers`); without them only the JAX rows are printed.

    python scripts/train_step.py [--model 76m|tiny] [--dtype float32|bfloat16] [--steps 5]
                                    [--profile DIR]

The step is stage 2's: the CLIP tower frozen, the query transformer (the released resampler)
and the LLM trained with AdamW, batch 8 x 320 tokens, every row one image at m = 64. --dtype
bfloat16 computes in bfloat16 with float32 parameters in both frameworks (ModelConfig.dtype;
torch.autocast), as the paper trains; the default is float32.
PyTorch runs transformers' CLIPVisionModel and LlamaForCausalLM with a resampler of the
released shape (a learned query, LayerNorms, one multi-head attention, a projection); the
visual tokens go after BOS, as our splice puts them. Both use every CPU core (torch threads =
os.cpu_count()). Times are the median of --steps steps after two warm-up steps; "CPU s" is
process CPU time per step (all threads). --profile writes a jax.profiler trace of one JAX
step (open it in TensorBoard or Perfetto).

Each row also gives the step's model FLOPs per second (the forward FLOPs of `mqt_jax.core.flops`,
three times over for the trained query transformer and LLM, once for the frozen tower) and
that as a share of the machine's matrix-product peak, measured here as the best of a few
[2048 x 2048] x [2048 x 2048] products in the same framework and dtype: what the step could
reach if it were nothing but large matrix products.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from mqt_jax.config import (
    LLMConfig,
    MeshConfig,
    ModelConfig,
    MSampler,
    QueryTransformerConfig,
    TrainConfig,
    VisionConfig,
)
from mqt_jax.core import flops, sharding, splice
from mqt_jax.core.outputs import markdown_table
from mqt_jax.training.trainer import Trainer

BATCH, SEQ, M = 8, 320, 64


def model_config(name: str, dtype: str = "float32") -> ModelConfig:
    return dataclasses.replace(_shape(name), dtype=dtype)


def _shape(name: str) -> ModelConfig:
    if name == "76m":  # about 76M parameters: a 10-layer ViT-S-like tower, an 8 x 512 LLaMA
        return ModelConfig(
            vision=VisionConfig(image_size=64, patch_size=8, width=384, num_layers=10,
                                num_heads=6, mlp_dim=1536),
            query=QueryTransformerConfig(num_queries=M, width=384, num_heads=6),
            llm=LLMConfig(vocab_size=32000, hidden=512, num_layers=8, num_heads=8,
                          num_kv_heads=8, head_dim=64, mlp_dim=1408),
            remat_policy="none")
    if name == "tiny":  # configs/tiny.gin's model
        return ModelConfig(
            vision=VisionConfig(image_size=64, patch_size=8, width=128, num_layers=4,
                                num_heads=4, mlp_dim=512),
            query=QueryTransformerConfig(num_queries=M, width=128, num_heads=4),
            llm=LLMConfig(vocab_size=512, hidden=256, num_layers=4, num_heads=8,
                          num_kv_heads=4, head_dim=32, mlp_dim=688),
            remat_policy="none")
    raise ValueError(f"--model {name!r}: expected 76m or tiny")


def batch(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """BATCH rows of [BOS, image at m = M, text]: every row exactly SEQ tokens, loss on the text."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(BATCH):
        text = rng.integers(3, cfg.llm.vocab_size, size=SEQ - 1 - M).tolist()
        rows.append([splice.Example([1, splice.IMAGE_TOKEN] + text, [splice.IGNORE] * 2 + text)])
    m = np.full((BATCH, 1), M, np.int32)
    images = rng.normal(size=(BATCH, 1, cfg.vision.image_size, cfg.vision.image_size, 3))
    return {"images": images.astype(np.float32), "m": m,
            **splice.layout_rows(rows, m, cfg.num_queries, SEQ)}


def timed(step, steps: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per step, after two warm-up steps."""
    for _ in range(2):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def jax_step(cfg: ModelConfig, data: dict, profile: str | None):
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    config = TrainConfig(batch_size=BATCH, seq_len=SEQ, trainable=("query_transformer", "llm"),
                         log_every=10)
    trainer = Trainer(cfg, config, mesh, MSampler(distribution="constant"))
    state = [trainer.init_state()]

    def step():
        state[0], metrics = trainer.step(state[0], data)
        jax.block_until_ready(metrics["loss"])

    result = timed(step, ARGS.steps)
    if profile:
        with jax.profiler.trace(profile):
            step()
    return result


def torch_step(cfg: ModelConfig, data: dict):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    v, q, c = cfg.vision, cfg.query, cfg.llm
    tower = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers_built,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="quick_gelu")).eval()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, attn_implementation="sdpa"))

    class Resampler(torch.nn.Module):  # the released query transformer's shape
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(0.02 * torch.randn(q.num_queries, q.width))
            self.pos_q = torch.nn.Parameter(torch.zeros(q.num_queries, q.width), requires_grad=False)
            self.pos_k = torch.nn.Parameter(torch.zeros(v.num_patches, q.width), requires_grad=False)
            self.ln_q, self.ln_kv = torch.nn.LayerNorm(q.width), torch.nn.LayerNorm(q.width)
            self.attn = torch.nn.MultiheadAttention(q.width, q.num_heads, batch_first=True)
            self.proj = torch.nn.Parameter(q.width ** -0.5 * torch.randn(q.width, c.hidden))

        def forward(self, x, m):
            x = self.ln_kv(x)
            query = self.ln_q(self.query[:m] + self.pos_q[:m]).expand(x.shape[0], -1, -1)
            out, _ = self.attn(query, x + self.pos_k, x, need_weights=False)
            return out @ self.proj

    resampler = Resampler()
    trained = [p for p in [*resampler.parameters(), *llm.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    images = torch.from_numpy(data["images"][:, 0]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(data["token_ids"]).long()
    text = torch.cat([ids[:, :1], ids[:, 1 + M:]], 1)  # BOS, then the text after the image
    targets = torch.from_numpy(np.where(data["loss_mask"], data["targets"], -100)).long()

    autocast = torch.autocast("cpu", torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def step():
        with autocast:
            with torch.no_grad():  # the frozen tower
                features = tower(pixel_values=images).last_hidden_state[:, 1:]
            visual = resampler(features, M)
            embeds = llm.get_input_embeddings()(text)
            x = torch.cat([embeds[:, :1], visual, embeds[:, 1:]], 1)
            logits = llm(inputs_embeds=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()

    return timed(step, ARGS.steps), sum(p.numel() for p in [*tower.parameters(), *trained])


def step_flops(cfg: ModelConfig) -> float:
    """Model FLOPs of one step: forward and backward (3x the forward) of the query transformer
    and the LLM over the whole batch, the frozen tower's forward once."""
    trained = flops.llm_flops(cfg.llm, SEQ) + flops.inference_flops(cfg, M, 0)["query"]
    return BATCH * (3 * trained + flops.vision_flops(cfg.vision))


def matmul_peak(framework: str, dtype: str, n: int = 2048, tries: int = 5) -> float:
    """The best FLOP/s of an [n, n] x [n, n] product in `framework` ("jax" or "torch")."""
    if framework == "jax":
        import jax.numpy as jnp

        a = jnp.ones((n, n), dtype)
        product = jax.jit(lambda x, y: x @ y)
        run = lambda: product(a, a).block_until_ready()  # noqa: E731
    else:
        import torch

        a = torch.ones((n, n), dtype=getattr(torch, dtype))
        run = lambda: a @ a  # noqa: E731
    run()
    best = min(timed_once(run) for _ in range(tries))
    return 2 * n**3 / best


def timed_once(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    cfg = model_config(ARGS.model, ARGS.dtype)
    data = batch(cfg)
    rows = []
    wall, cpu = jax_step(cfg, data, ARGS.profile)
    n_params = flops.count(Trainer(cfg, TrainConfig(batch_size=1, seq_len=SEQ),
                                   sharding.make_mesh(MeshConfig(), jax.devices()[:1])
                                   ).abstract_params())
    rows.append({"framework": f"mqt_jax (jax {jax.__version__})", "step_s": wall, "cpu_s": cpu,
                 "peak": matmul_peak("jax", ARGS.dtype)})
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        (t_wall, t_cpu), _ = torch_step(cfg, data)
        rows.append({"framework": f"PyTorch {torch.__version__} + transformers", "step_s": t_wall,
                     "cpu_s": t_cpu, "peak": matmul_peak("torch", ARGS.dtype)})
    model_flops = step_flops(cfg)
    for row in rows:
        row["tokens_per_s"] = BATCH * SEQ / row["step_s"]
        row["gflops"] = model_flops / row["step_s"] / 1e9
        row["vs_torch"] = rows[-1]["step_s"] / row["step_s"] if torch is not None else None
    print(f"train step, {ARGS.model} model ({n_params / 1e6:.0f}M parameters), batch {BATCH} x "
          f"{SEQ} tokens, m = {M}, {ARGS.dtype}, AdamW; {os.cpu_count()} CPU cores; median of "
          f"{ARGS.steps} steps; {model_flops / 1e9:.1f} GFLOP a step\n")
    print(markdown_table(["framework", "step (s)", "CPU s / step", "tokens / s", "GFLOP/s",
                          "matmul peak GFLOP/s", "share of peak", "throughput vs PyTorch"],
                         [[r["framework"], f"{r['step_s']:.2f}", f"{r['cpu_s']:.1f}",
                           f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.0f}",
                           f"{r['peak'] / 1e9:.0f}", f"{r['gflops'] * 1e9 / r['peak']:.0%}",
                           f"{r['vs_torch']:.2f}x" if r["vs_torch"] else ""] for r in rows]))
    if ARGS.out:
        Path(ARGS.out).write_text(json.dumps({"model": ARGS.model, "dtype": ARGS.dtype, "params": n_params,
                                              "step_gflop": model_flops / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="76m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", help="write a jax.profiler trace of one step here")
    parser.add_argument("--out", help="also write the rows as JSON here")
    ARGS = parser.parse_args()
    main()
