"""Small configurations and batches shared by the tests."""

from __future__ import annotations

import base64
import io
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np

from mqt_jax.config import LLMConfig, ModelConfig, QueryTransformerConfig, VisionConfig
from mqt_jax.core import splice


def tiny_config(variant="official", query_mask="prefix", num_queries=16, **model_kw) -> ModelConfig:
    """A model small enough for float32 value tests in well under a second."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, num_layers=3, num_heads=4,
                            mlp_dim=64),
        query=QueryTransformerConfig(variant=variant, num_queries=num_queries, width=32,
                                     num_heads=4, num_layers=2, mlp_dim=48,
                                     query_mask=query_mask),
        llm=LLMConfig(vocab_size=64, hidden=48, num_layers=2, num_heads=6, num_kv_heads=2,
                      head_dim=8, mlp_dim=80, rope_theta=500.0),
        **model_kw,
    )


def conversation(rng, vocab, before=3, after=5, answer=3) -> splice.Example:
    """[BOS, before..., <image>, after..., answer...] with loss on the answer."""
    text = rng.integers(2, vocab, size=before + after + answer).tolist()
    tokens = [1] + text[:before] + [splice.IMAGE_TOKEN] + text[before:]
    labels = [splice.IGNORE] * (len(tokens) - answer) + text[-answer:]
    return splice.Example(tokens, labels)


def random_batch(cfg: ModelConfig, m, seq_len=48, seed=0, examples=None) -> dict:
    """One single-image example per row at the given per-row m."""
    rng = np.random.default_rng(seed)
    m = np.asarray(m, np.int32).reshape(-1, 1)
    examples = examples or [conversation(rng, cfg.llm.vocab_size) for _ in range(len(m))]
    size = cfg.vision.image_size
    images = rng.normal(size=(len(m), 1, size, size, 3)).astype(np.float32)
    arrays = splice.layout_rows([[e] for e in examples], m, cfg.num_queries, seq_len)
    return {"images": images, "m": m, **arrays}


def init_params(module, *args, method=None, seed=0, **kwargs) -> dict:
    """Unboxed parameters, initialised under jit (eager init compiles op by op: slow)."""
    from functools import partial

    import jax
    from flax import linen as nn

    init = jax.jit(partial(module.init, method=method))
    return nn.meta.unbox(init(jax.random.key(seed), *args, **kwargs)["params"])


SENTENCES = ["What shape is in the picture?", "A red circle on a blue square.",
             "How many triangles are there?", "The colour of the star is green.",
             "Describe the image in one word.", "Yes, no, left, right, top, bottom."] * 20


def write_run(folder, variant="official", query_mask="prefix", num_queries=16, seed=0,
              scale=50.0):
    """A run folder as `mqt-jax convert` writes one (config.gin, checkpoints/, tokenizer/) of
    a tiny model with random parameters, whose embeddings are scaled up so that greedy answers
    depend on the image, the question and m (a fresh LLM repeats one token). Returns the
    ModelConfig. Takes a few seconds."""
    import dataclasses
    from pathlib import Path

    import jax

    from mqt_jax.config import gin_bindings
    from mqt_jax.data.tokenizer import train_sentencepiece
    from mqt_jax.interop.convert import save_params
    from mqt_jax.models.vlm import VisionLanguageModel

    folder = Path(folder)
    train_sentencepiece(SENTENCES, folder / "tokenizer", vocab_size=300)
    cfg = tiny_config(variant, query_mask, num_queries)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=300))
    batch = random_batch(cfg, [num_queries], seq_len=32)
    params = init_params(VisionLanguageModel(cfg), batch, method="logits", seed=seed)
    params = dict(params, llm=dict(params["llm"], embedding=params["llm"]["embedding"] * scale))
    lines = []
    for field, name in (("vision", "VisionConfig"), ("query", "QueryTransformerConfig"),
                        ("llm", "LLMConfig")):
        lines += gin_bindings(getattr(cfg, field)) + [f"ModelConfig.{field} = @{name}()"]
    lines += ["ModelConfig.remat_policy = 'none'", "MeshConfig.data = 1", "MeshConfig.fsdp = -1",
              f"EvalConfig.tokenizer_dir = {str(folder.absolute() / 'tokenizer')!r}",
              "EvalConfig.template = 'vicuna_v1'"]
    save_params(folder, jax.device_get(params), "\n".join(lines) + "\n")
    return cfg


# ---- a live server (tests/test_server.py, tests/test_multihost.py) ----

def png(seed, size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, size + (3,), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text, url=None):
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def one_device_env() -> dict:
    """This environment with XLA simulating one CPU device instead of the suite's 8 (its other
    flags kept): for server subprocesses. On a loaded 2-core machine a server on 8 simulated
    devices can stall for good (seen here: the engine waiting on a decode step that no XLA
    thread runs, every device thread idle); sharded serving is tested in-process
    (test_engine) and across processes (test_multihost)."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip()}


class Server:
    """`mqt-jax serve` of a run folder on a free port of 127.0.0.1, with an openai client."""

    def __init__(self, folder, tmp, *flags, env=None):
        self.log = open(tmp / "server.err", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqt_jax.cli", "serve", "--workdir", str(folder), "--port", "0",
             "--cache_len", "384", "--model_name", "tiny", *flags],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        deadline = time.time() + 180
        line = ""
        while time.time() < deadline and "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {(tmp / 'server.err').read_text()[-2000:]}")
        self.url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                    timeout=120)

    def ask(self, text="What colour?", url=None, **kw):
        kw.setdefault("max_tokens", 4)
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(model="tiny", messages=user(text, url), **kw)

    def metric(self, name) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    def log_tail(self) -> str:
        """The end of the server's log, after every thread's stack (SIGUSR1, see serve)."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
        return "the server's log ends: " + pathlib.Path(self.log.name).read_text()[-6000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        # captured output, which pytest shows only when the test failed
        print("the server's log ends:", pathlib.Path(self.log.name).read_text()[-6000:])


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not part of the package)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
