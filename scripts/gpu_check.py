"""GPU check: cuDNN's fused attention against XLA's on a packed batch, and the MFU of a
~1B-class LLM + MQT stage-2 train step with each kernel, printed as tables.

    python scripts/gpu_check.py [--steps 5] [--batch 8] [--seq 2048]
    python scripts/gpu_check.py --smoke      # any machine: tiny sizes; splash (interpreted) vs xla

1. Attention: q, k, v in bfloat16 over rows holding several packed examples (segment ids)
   and padding; `attention="cudnn"` against `"xla"` (mqt_jax/models/attention.py), outputs
   and gradients, on the tokens that carry loss. Max abs error and the relative error.
2. Step: a TinyLlama-1.1B-shaped LLM (22 x 2048, GQA 32 / 4 heads, SwiGLU 5632, vocab 32000)
   with a frozen ViT-B/16-224-shaped tower and the MQT resampler (M = 256), stage 2's trainable
   parts, bfloat16 compute over float32 master weights, AdamW, m drawn per example, batch x
   seq tokens. Step time (median after two warm-ups), model FLOPs (mqt_jax.core.flops: the LLM's
   forward + backward + what remat recomputes, the tower's forward) and MFU against the
   device's peak bfloat16 (mqt_jax.core.flops.PEAK_TFLOPS), for attention xla and cudnn.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
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
from mqt_jax.models.attention import CausalSegments, attend
from mqt_jax.training.trainer import Trainer


def packed_segments(rows: int, length: int, seed: int = 0) -> np.ndarray:
    """Segment ids of rows packed with examples of random lengths, then padding (0)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, length), np.int32)
    for r in range(rows):
        at, k = 0, 1
        while at < length * 0.9:
            n = int(rng.integers(length // 8, length // 2))
            ids[r, at:at + n], at, k = k, at + n, k + 1
    return ids


def attention_check(kernels: list[str], rows=4, length=1024, heads=16, kv_heads=4, dim=128) -> list:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(rows, length, heads, dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(rows, length, kv_heads, dim)), jnp.bfloat16) for _ in "kv")
    segments = jnp.asarray(packed_segments(rows, length))
    mask = CausalSegments(segments, segments)
    keep = (segments > 0)[..., None, None]

    def out_and_grads(kernel):
        loss = lambda *qkv: (attend(*qkv, mask, kernel).astype(jnp.float32) * keep).sum()  # noqa: E731
        out = jax.jit(lambda *qkv: attend(*qkv, mask, kernel))(q, k, v)
        return [out] + list(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))

    reference = [np.asarray(x, np.float32) for x in out_and_grads("xla")]
    table = []
    for kernel in kernels:
        got = [np.asarray(x, np.float32) for x in out_and_grads(kernel)]
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, reference):
            if name == "output":  # padding's outputs carry no loss
                a, b = np.where(keep, a, 0), np.where(keep, b, 0)
            err = float(np.abs(a - b).max())
            table.append([kernel, name, f"{err:.3g}", f"{err / max(float(np.abs(b).max()), 1e-30):.2e}"])
    return table


def one_b_config(attention: str, smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, num_layers=2, num_heads=4,
                                mlp_dim=64),
            query=QueryTransformerConfig(num_queries=16, width=32, num_heads=4),
            llm=LLMConfig(vocab_size=256, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, mlp_dim=128),
            dtype="bfloat16", remat_policy="none", attention=attention)
    return ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, num_layers=12,
                            num_heads=12, mlp_dim=3072, select_layer=-2),
        query=QueryTransformerConfig(num_queries=256, width=768, num_heads=12),
        llm=LLMConfig(vocab_size=32000, hidden=2048, num_layers=22, num_heads=32,
                      num_kv_heads=4, head_dim=64, mlp_dim=5632),
        dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable", attention=attention)


def step_check(attention: str, smoke: bool, batch: int, seq: int, steps: int) -> list:
    cfg = one_b_config(attention, smoke)
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    config = TrainConfig(batch_size=batch, seq_len=seq, trainable=("query_transformer", "llm"))
    sampler = MSampler("official")
    trainer = Trainer(cfg, config, mesh, sampler)
    state = [trainer.init_state()]
    rng = np.random.default_rng(0)
    m = sampler.sample(cfg.num_queries, (batch, 1), 0, 0)
    rows = []
    for r in range(batch):  # one example per row, text filling the row after BOS and m tokens
        text = rng.integers(3, cfg.llm.vocab_size, size=seq - 1 - int(m[r, 0])).tolist()
        rows.append([splice.Example([1, splice.IMAGE_TOKEN] + text, [splice.IGNORE] * 2 + text)])
    size = cfg.vision.image_size
    data = {"images": rng.normal(size=(batch, 1, size, size, 3)).astype(np.float32), "m": m,
            **splice.layout_rows(rows, m, cfg.num_queries, seq)}

    def step():
        state[0], metrics = trainer.step(state[0], data)
        jax.block_until_ready(metrics["loss"])

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    model_flops = (flops.train_step_flops(cfg.llm, batch, seq, cfg.remat_policy)
                   + batch * flops.vision_flops(cfg.vision))
    peak = flops.peak_flops()
    mfu = f"{model_flops / seconds / peak:.1%}" if peak else "n/a (no known peak)"
    return [attention, f"{flops.count(trainer.abstract_params()['llm']) / 1e9:.2f} B", f"{batch} x {seq}",
            f"{seconds * 1e3:.1f}", f"{model_flops / seconds / 1e12:.1f}", mfu]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any machine")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        parser.error(f"no GPU here (jax backend {jax.default_backend()!r}); --smoke runs the tiny model")
    kernels = ["cudnn"] if on_gpu else []  # (--smoke off a GPU: splash, interpreted, for the table)
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}\n")
    if args.smoke:
        args.batch, args.seq = 4, 64
    length = 1024 if not args.smoke else 128
    print("Attention, packed batch, bfloat16 (against xla):\n" + markdown_table(
        ["kernel", "tensor", "max abs error", "relative to max |xla|"],
        attention_check(kernels or ["splash"], length=length)) + "\n")
    rows = [step_check(a, args.smoke, args.batch, args.seq, args.steps) for a in ["xla"] + kernels]
    print("Stage-2 train step, ~1B LLM + MQT (M = 256), bfloat16:\n" + markdown_table(
        ["attention", "LLM parameters", "batch", "step (ms)", "model TFLOP/s", "MFU"], rows))


if __name__ == "__main__":
    main()
