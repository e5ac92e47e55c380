"""One process of a sharded generation run (tests/test_multihost.py starts it as 2 processes x
4 CPU devices and as 1 x 8): random tiny-model parameters from a fixed seed, 16 prompts of
different lengths ending in different tokens (so the rows' answers differ), greedy and
sampled, at several m (one bucket for all: one compilation). Process 0 writes every row's
token ids as JSON.

    python tests/generate_worker.py --out F [--coordinator_address H:P --num_processes N --process_id I]
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config  # noqa: E402

from mqt_jax.config import (  # noqa: E402
    MeshConfig,
    SamplingConfig,  # noqa: E402
    TrainConfig,
)
from mqt_jax.core import sharding, splice  # noqa: E402
from mqt_jax.inference.generate import Generator  # noqa: E402
from mqt_jax.training.trainer import Trainer, merge_params

M_VALUES = (1, 5, 16)
SAMPLINGS = {"greedy": SamplingConfig(max_new_tokens=6),
             "sampled": SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3)}


def requests(cfg, n=16, seed=0):
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        text = rng.integers(3, cfg.llm.vocab_size, size=4 + i % 7).tolist()
        tokens = [1] + text[:2] + [splice.IMAGE_TOKEN] + text[2:]
        prompts.append(splice.Example(tokens, [splice.IGNORE] * len(tokens)))
    size = cfg.vision.image_size
    return prompts, rng.normal(size=(n, size, size, 3)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    sharding.initialize_distributed(False, args.coordinator_address, args.num_processes,
                                    args.process_id)
    cfg = tiny_config(num_queries=16)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    state = Trainer(cfg, TrainConfig(batch_size=8, seq_len=32), mesh).init_state(seed=0)
    params = merge_params(state.trainable, state.frozen)  # sharded over both processes
    prompts, images = requests(cfg)
    out = {}
    for name, sampling in SAMPLINGS.items():
        generator = Generator(cfg, params, mesh, eos_id=2, sampling=sampling, batch_size=8, bucket=32)
        out[name] = {m: generator(prompts, images, m) for m in M_VALUES}
    if jax.process_index() == 0:
        Path(args.out).write_text(json.dumps({"processes": jax.process_count(),
                                              "devices": jax.device_count(), "ids": out}))


if __name__ == "__main__":
    main()
