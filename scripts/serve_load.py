"""Serving under load, and the decode step against the PyTorch peer; prints Markdown tables.

    python scripts/serve_load.py [--requests 40] [--rates 1,2] [--sections decode,cache,load]
        [--m_values 16,64,256] [--lengths 8,32,64]

Model: the "mid" model of inference_latency.py (224 px, M = 256, a 12 x 768 LLM), random
weights (speed does not depend on training), a small sentencepiece tokenizer.

- decode: tokens/s of one decode step for 8 rows (the engine's), next to Hugging Face
  `transformers` LlamaForCausalLM.generate with its KV cache on the same LLM shape and prompt
  length (torch on CPU: a benchmark-only extra), at m = 16 and m = 256. transformers' rate is
  the extra tokens over the extra time of generating N tokens instead of 1 (prefill cancels).
- cache: the same image asked again at another m, with the vision cache on and off.
- load: `mqt-jax serve`'s app on 127.0.0.1, a fixed number of streamed requests arriving as a
  Poisson process at each rate, m drawn from --m_values (default {16, 64, 256}) and answer
  lengths from --lengths (default {8, 32, 64}; EOS off, so every answer has its length); requests/s, output tokens/s, time to
  first token and latency p50 / p99, in all and per m, for three schedules of the same
  engine: static batching (a batch enters an empty engine and runs to its longest answer),
  one m at a time (continuous, but a batch never mixes m) and mixed m (continuous). The
  output head keeps only the tokenizer's ids (`speaking`), so every token streams text.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from inference_latency import model_config, requests  # noqa: E402

from mqt_jax.config import (
    EngineConfig,
    EvalConfig,  # noqa: E402
    MeshConfig,
    TrainConfig,  # noqa: E402
)
from mqt_jax.core import sharding  # noqa: E402
from mqt_jax.core.outputs import markdown_table  # noqa: E402
from mqt_jax.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from mqt_jax.inference.api import Model  # noqa: E402
from mqt_jax.inference.engine import Engine, Request  # noqa: E402
from mqt_jax.run import TrainedRun  # noqa: E402
from mqt_jax.training.trainer import Trainer, merge_params

WORDS = ("what shape colour image picture how many where left right top bottom is the a of "
         "in on describe circle square triangle star red green blue yes no").split()


def build_model(name: str = "mid") -> Model:
    """inference_latency.py's model `name` with random weights and a small tokenizer."""
    cfg = model_config(name)
    mesh = sharding.make_mesh(MeshConfig())
    state = Trainer(cfg, TrainConfig(batch_size=8), mesh).init_state(seed=0)
    params = merge_params(state.trainable, state.frozen)
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="serve_load_"))
    train_sentencepiece([" ".join(rng.choice(WORDS, 12)) for _ in range(400)], folder, 300)
    return Model(TrainedRun(folder, 0, cfg, EvalConfig(), mesh, params), load_tokenizer(folder))


def speaking(model: Model) -> Model:
    """The model with its output head's columns beyond the tokenizer's pieces zeroed: random
    weights then mostly pick ids that have text, so streamed chunks carry content (time to
    first token is seen by the client) at the same cost per step (the head keeps its shape)."""
    import jax.numpy as jnp

    head = model.params["llm"]["lm_head"]
    keep = jnp.arange(head["kernel"].shape[-1]) < model.tokenizer.vocab_size
    kernel = jax.jit(lambda k: jnp.where(keep, k, 0))(head["kernel"])
    params = dict(model.params, llm=dict(model.params["llm"], lm_head=dict(head, kernel=kernel)))
    run = model.run
    return Model(TrainedRun(run.path, 0, model.config, run.eval_config, run.mesh, params),
                 model.tokenizer)


def fmt(rows, cols):
    return markdown_table(cols, [[r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.3g}"
                                  for c in cols] for r in rows])


# ---- decode ----
def engine_decode(model: Model, m: int, text_tokens: int, steps: int = 20) -> dict:
    """One decode step with 8 live rows; and a prefill of 8 prompts (vision pass included)."""
    prompts, images = requests(model.config, 8, text_tokens)
    engine = Engine(model, EngineConfig(slots=8, cache_len=1024, prefill_batch=8, bucket=16,
                                        vision_cache_mb=0), eos_id=-1)
    for p, im in zip(prompts, images):
        engine.submit(Request(p, im, m, steps + 4))
    engine.step()  # compiles prefill and decode
    engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - t) / steps
    engine.run()
    t = time.perf_counter()
    engine.run([Request(p, im, m, 1) for p, im in zip(prompts, images)])  # prefill alone
    return {"decode_tok_s": 8 / step_s, "step_ms": 1e3 * step_s,
            "prefill_ms": 1e3 * (time.perf_counter() - t)}


def torch_decode(model: Model, m: int, text_tokens: int, new_tokens: int = 32) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = model.config.llm
    torch.manual_seed(0)
    peer = LlamaForCausalLM(LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.mlp_dim,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim)).eval()
    ids = torch.randint(3, llm.vocab_size, (8, text_tokens + m))

    def run(n):
        with torch.no_grad():
            t = time.perf_counter()
            peer.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - t

    run(2)
    one = np.median([run(1) for _ in range(3)])
    many = np.median([run(new_tokens) for _ in range(3)])
    return {"decode_tok_s": 8 * (new_tokens - 1) / (many - one), "prefill_ms": 1e3 * one}


def decode_section(model: Model, text_tokens: int) -> str:
    rows = []
    for m in (16, 256):
        ours, peer = engine_decode(model, m, text_tokens), torch_decode(model, m, text_tokens)
        rows += [{"system": "mqt_jax engine", "m": m, **ours},
                 {"system": "transformers generate", "m": m, "step_ms": 8e3 / peer["decode_tok_s"], **peer}]
    return fmt(rows, ["system", "m", "decode_tok_s", "step_ms", "prefill_ms"])


# ---- the vision cache ----
def cache_section(model: Model, text_tokens: int) -> str:
    prompts, images = requests(model.config, 1, text_tokens)
    rows = []
    for cache_mb in (256.0, 0.0):
        engine = Engine(model, EngineConfig(slots=8, cache_len=1024, prefill_batch=8, bucket=16,
                                            vision_cache_mb=cache_mb), eos_id=-1)
        engine.run([Request(prompts[0], images[0], 16, 1)])  # compiles; the image is seen at m=16
        engine.run([Request(prompts[0], images[0], 64, 1)])  # compiles m=64's bucket
        times = []
        for _ in range(3):
            t = time.perf_counter()
            engine.run([Request(prompts[0], images[0], 64, 1)])
            times.append(time.perf_counter() - t)
        rows.append({"vision cache": "on" if cache_mb else "off", "same image at m=64 (ms)":
                     1e3 * float(np.median(times)), "vision passes": engine.stats["vision_passes"]})
    return fmt(rows, list(rows[0]))


# ---- load ----
def png_url(seed: int, size: int) -> str:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: Model, policy: str):
    import uvicorn

    from mqt_jax.serving.server import ServeConfig, make_app

    engine = Engine(model, EngineConfig(slots=8, cache_len=512, prefill_batch=4, bucket=32,
                                        policy=policy), eos_id=-1)
    app = make_app(model, engine, ServeConfig(default_m=16, model_name="mid"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one(client, url, body, out):
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    out.append({"m": body["m"], "ttft": (first or end) - start, "latency": end - start,
                "tokens": tokens, "end": end})


async def offered_load(url: str, jobs: list[dict], rate: float, seed: int) -> tuple[list, float]:
    import httpx

    rng = np.random.default_rng(seed)
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        start, tasks = time.perf_counter(), []
        for body in jobs:
            await asyncio.sleep(rng.exponential(1 / rate))
            tasks.append(asyncio.create_task(one(client, url, body, out)))
        await asyncio.gather(*tasks)
    return out, time.perf_counter() - start


def summarise(results: list[dict], seconds: float) -> dict:
    ttft = np.array([r["ttft"] for r in results])
    lat = np.array([r["latency"] for r in results])
    return {"req_s": len(results) / seconds, "out_tok_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "lat_p50": np.percentile(lat, 50), "lat_p99": np.percentile(lat, 99)}


def load_section(model: Model, n: int, rates: list[float], text_tokens: int,
                 m_values: list[int], lengths: list[int]) -> str:
    rng = np.random.default_rng(1)
    images = [png_url(i, 224) for i in range(12)]
    jobs = [{"model": "mid", "stream": True, "stream_options": {"include_usage": True},
             "temperature": 0, "m": int(rng.choice(m_values)),
             "max_tokens": int(rng.choice(lengths)),
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": images[int(rng.integers(12))]}},
                 {"type": "text", "text": " ".join(rng.choice(WORDS, int(rng.integers(4, text_tokens))))}]}]}
            for _ in range(n)]
    rows = []
    names = {"static": "(a) static batching", "per_m": "(b) one m at a time", "mixed": "(c) mixed m"}
    for policy in ("static", "per_m", "mixed"):
        server, thread, url = start_server(model, policy)
        warm = [dict(j, max_tokens=2) for j in jobs[:12]]  # compile every bucket first
        asyncio.run(offered_load(url, warm, 100.0, 0))
        for rate in rates:
            results, seconds = asyncio.run(offered_load(url, jobs, rate, seed=2))
            rows.append({"schedule": names[policy], "rate": rate, "m": "all",
                         **summarise(results, seconds)})
            for m in m_values:
                part = [r for r in results if r["m"] == m]
                rows.append({"schedule": names[policy], "rate": rate, "m": str(m),
                             **summarise(part, seconds)})
        server.should_exit = True
        thread.join()
        print(f"  {policy} done", file=sys.stderr, flush=True)
    return fmt(rows, ["schedule", "rate", "m", "req_s", "out_tok_s", "ttft_p50", "ttft_p99",
                      "lat_p50", "lat_p99"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="decode,cache,load")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate")
    parser.add_argument("--rates", default="1,2", help="offered requests per second")
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--m_values", default="16,64,256", help="load: the m drawn per request")
    parser.add_argument("--lengths", default="8,32,64", help="load: the answer lengths drawn")
    args = parser.parse_args()
    sections = args.sections.split(",")
    model = build_model()
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind} ({device.platform}); mid model "
          f"(224 px, M = 256, 12 x 768 LLM), random weights\n")
    if "decode" in sections:
        print(f"## Decode step, 8 rows, {args.text_tokens} text tokens + m\n")
        print(decode_section(model, args.text_tokens) + "\n", flush=True)
    if "cache" in sections:
        print("## The same image at a second m\n")
        print(cache_section(model, args.text_tokens) + "\n", flush=True)
    if "load" in sections:
        rates = [float(r) for r in args.rates.split(",")]
        m_values, lengths = ([int(v) for v in a.split(",")] for a in (args.m_values, args.lengths))
        print(f"## Load: {args.requests} streamed requests per rate, Poisson arrivals, 8 slots, "
              f"m in {m_values}, answers of {lengths} tokens (seconds; rates in requests/s)\n")
        print(load_section(speaking(model), args.requests, rates, args.text_tokens, m_values, lengths),
              flush=True)


if __name__ == "__main__":
    main()
