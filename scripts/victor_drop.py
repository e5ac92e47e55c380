"""Victor's drop in wall time: the LLM prefill with the patch tokens leaving at layer k,
against the same LLM over the whole sequence (LLaVA-1.5's cost) and over the survivors
alone (the floor). Printed as a Markdown table (--out also writes JSON).

    python scripts/victor_drop.py [--layers 8] [--hidden 512] [--k 1,2,3,4] [--batch 2]

XLA's cost_analysis() counts both branches of the per-layer conditional, so the saving can
only be seen by timing. "stack" is the decoder layers alone, where the drop happens;
"forward" adds the output head (over the survivors) and puts Victor's logits back at their
positions ([B, T, vocab], a memory-bound scatter). "flops_ratio" is the stack's analytical
FLOPs at k over no drop (flops.llm_flops); "stack_ratio" the measured one;
"stack_over_flops" near 1 means the dropped tokens really cost nothing after layer k. Random weights: timing does not depend on
training. The default sequence is MQT-LLaVA's: 576 patches (336 px / 14) + 16 registers + 64
text tokens, through a small LLaMA so it runs on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax.config import LLMConfig
from mqt_jax.core import flops
from mqt_jax.core.outputs import markdown_table
from mqt_jax.models.llama import Llama


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(llm: LLMConfig, patches: int, registers: int, text: int, batch: int,
            k_values: list[int], repeats: int) -> list[dict]:
    t, kept_len = 1 + patches + registers + text, 1 + registers + text
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, t, llm.hidden)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    segments = jnp.ones((batch, t), jnp.int32)
    dropped = jnp.broadcast_to((positions >= 1) & (positions < 1 + patches), (batch, t))
    params = Llama(llm).init(jax.random.key(0), x[:, :8], positions[:, :8], segments[:, :8])

    def timings(drop_layer: int, x) -> dict:
        """Seconds of the decoder stack alone (where the drop happens) and of the whole
        forward (+ output head, and for Victor the logits put back at their positions)."""
        model, n = Llama(llm, drop_layer=drop_layer), x.shape[1]
        args = (positions[:, :n], segments[:, :n]) + ((dropped, kept_len) if drop_layer else ())
        stack = jax.jit(lambda p, x: model.apply(
            p, x, args[0], args[1], None, *args[2:], method=lambda m, *a: m._layers(*a)[0]))
        forward = jax.jit(lambda p, x: model.apply(p, x, *args))
        return {"stack_s": timed(stack, params, x, repeats=repeats),
                "forward_s": timed(forward, params, x, repeats=repeats)}

    def stack_flops(k: int) -> float:  # the first k layers on all t tokens, the rest on K
        return (flops.llm_flops(llm, t, layers=k, head=False)
                + flops.llm_flops(llm, kept_len, layers=llm.num_layers - k, head=False))

    rows = [{"run": "no drop (all tokens, every layer)", "k": llm.num_layers,
             **timings(0, x), "flops": stack_flops(llm.num_layers)}]
    rows += [{"run": f"victor, drop at layer {k}", "k": k, **timings(k, x), "flops": stack_flops(k)}
             for k in k_values]
    rows.append({"run": "survivors only (no patches at all)", "k": 0,
                 **timings(0, x[:, :kept_len]), "flops": stack_flops(0)})
    for r in rows:
        r["flops"] *= batch
        r["flops_ratio"] = r["flops"] / rows[0]["flops"]
        r["stack_ratio"] = r["stack_s"] / rows[0]["stack_s"]
        r["forward_ratio"] = r["forward_s"] / rows[0]["forward_s"]
        r["stack_over_flops"] = r["stack_ratio"] / r["flops_ratio"]
    return rows


def table(rows: list[dict]) -> str:
    cols = ["run", "k", "stack_ms", "forward_ms", "stack_gflops", "flops_ratio", "stack_ratio",
            "stack_over_flops", "forward_ratio"]
    return markdown_table(cols, [[r["run"], r["k"], f"{1e3 * r['stack_s']:.1f}",
                                  f"{1e3 * r['forward_s']:.1f}", f"{r['flops'] / 1e9:.1f}"]
                                 + [f"{r[c]:.3f}" for c in cols[5:]] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", default="1,2,3,4", help="drop layers to time")
    parser.add_argument("--patches", type=int, default=576)
    parser.add_argument("--registers", type=int, default=16)
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    heads = args.hidden // 64
    llm = LLMConfig(vocab_size=32000, hidden=args.hidden, num_layers=args.layers,
                    num_heads=heads, num_kv_heads=heads, head_dim=64, mlp_dim=args.hidden * 11 // 4)
    k_values = [int(v) for v in args.k.split(",")]
    if any(not 1 <= k < args.layers for k in k_values):
        parser.error(f"--k {args.k}: each drop layer must be in [1, {args.layers - 1}]")
    rows = measure(llm, args.patches, args.registers, args.text_tokens, args.batch, k_values,
                   args.repeats)
    device = jax.devices()[0]
    print(f"{device.device_kind} ({device.platform}); LLaMA {args.layers} layers x {args.hidden}; "
          f"batch {args.batch}; 1 BOS + {args.patches} patches + {args.registers} registers + "
          f"{args.text_tokens} text tokens\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
