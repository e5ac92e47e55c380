"""Peak host memory of `mqt-jax convert` on a 7B-shaped checkpoint.

Writes a random Vicuna-7B-shaped (LLaMA-2-7B) bfloat16 checkpoint in 5 GB safetensors shards,
then converts it in a fresh process, reading that process's peak resident memory (VmHWM)
after placing the parameters and after writing the orbax checkpoint. On this CPU host the
"devices" are host memory too, so the placed model itself counts; what the conversion adds on
top of it is the figure to compare with the largest single tensor.

    python scripts/convert_memory.py [--num_layers 32] [--workdir /tmp/convert_7b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mqt_jax.core.outputs import markdown_table

CHILD = r"""
import json, sys, time
from mqt_jax.interop import convert
from mqt_jax.core import sharding

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

src, out = sys.argv[1], sys.argv[2]
start, marks = time.time(), {"baseline": hwm()}
save = convert.save_params

def measured_save(*args, **kwargs):  # parameters are placed when convert() gets here
    marks.update(after_load=hwm(), load_s=time.time() - start)
    save(*args, **kwargs)

convert.save_params = measured_save
convert.convert("llama", src, out, param_dtype="bfloat16",
                mesh=sharding.make_mesh(MeshConfig()), progress=False)
print(json.dumps({**marks, "after_convert": hwm(), "convert_s": time.time() - start}))
"""


def write_checkpoint(folder: Path, num_layers: int) -> tuple[int, int]:
    import ml_dtypes

    from mqt_jax.config import LLMConfig
    from mqt_jax.core import hf
    from mqt_jax.interop.convert import llama_rules
    from mqt_jax.interop.export import hf_llama_config

    config = LLMConfig(num_layers=num_layers)  # LLaMA-2-7B / Vicuna-7B v1.5 otherwise
    rules = llama_rules(config, "model.", "lm_head.weight")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = [(r.hf_key, r.hf_shape, bf16) for r in rules]
    rng = np.random.default_rng(0)

    shapes = {key: shape for key, shape, _ in entries}

    def produce(key):
        return (rng.standard_normal(shapes[key], np.float32) * 0.02).astype(bf16)

    folder.mkdir(parents=True)
    hf.write_weights(folder, entries, produce)
    (folder / "config.json").write_text(json.dumps(hf_llama_config(config, "bfloat16")))
    sizes = [math.prod(s) * 2 for _, s, _ in entries]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_layers", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/mqt_convert_7b")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    total, largest = write_checkpoint(work / "hf", args.num_layers)
    write_s = time.time() - start
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device: every parameter whole in this process
    child = subprocess.run([sys.executable, "-c", CHILD, str(work / "hf"), str(work / "out")],
                           env=env, capture_output=True, text=True)
    if child.returncode:
        sys.exit(child.stderr[-3000:])
    m = json.loads(child.stdout.strip().splitlines()[-1])
    gb = 1e9
    print(f"LLaMA-2-7B shape with {args.num_layers} layers, bfloat16: {total / gb:.2f} GB in "
          f"safetensors (written in {write_s:.0f} s); largest tensor {largest / gb:.3f} GB\n")
    over = lambda peak: f"{(peak - total - m['baseline']) / gb:.2f}"  # noqa: E731
    print(markdown_table(["phase", "peak resident GB", "over the model GB", "time s"], [
        ["Python + jax, before reading", f"{m['baseline'] / gb:.2f}", "", ""],
        ["parameters placed (convert.load)", f"{m['after_load'] / gb:.2f}",
         over(m["after_load"]), f"{m['load_s']:.0f}"],
        ["+ orbax checkpoint written (whole convert)", f"{m['after_convert'] / gb:.2f}",
         over(m["after_convert"]), f"{m['convert_s']:.0f}"]]))
    print("\n'over the model' = peak - model bytes - the baseline: what the conversion holds on "
          "top of the placed parameters (on an accelerator those live in device memory).")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
