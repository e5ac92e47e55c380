"""The Python API: open a run, then ask it about images, each row at its own m.

    import mqt_jax
    model = mqt_jax.load("workdir/tiny")   # a training workdir, a recipe's, or a converted one
    model.generate([image_a, image_b], ["What shape is it?", "What colour?"], m=[4, 64])

Images are PIL images, paths, or [H, W, 3] uint8 arrays; prompts are questions, put into the
run's own conversation template. Rows of one call may carry different m: m is data, so one
compiled prefill serves the mixed batch (`mqt_jax.inference.generate.Generator`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mqt_jax.config import ModelConfig, SamplingConfig
from mqt_jax.core import sharding, splice
from mqt_jax.data.conversation import encode_prompt
from mqt_jax.data.preprocess import clip_preprocess, open_image
from mqt_jax.data.tokenizer import Tokenizer
from mqt_jax.inference.generate import (
    Generator,
    cut_at_stop,
    per_row,
    stop_tokens,
    vision_pass,
)
from mqt_jax.inference.policy import Escalate, Router, embedding_table, router_features
from mqt_jax.models.loss import token_nll
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel
from mqt_jax.run import TrainedRun, load_run


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer with what produced it (`generate(..., details=True)`)."""

    text: str
    tokens: list[int]  # up to, not including, EOS
    m: int
    logprobs: list[float]  # log p(token | prompt, the tokens before it) per token, temperature 1
    tried: tuple[int, ...] = ()  # m="auto": every m answered at on the way to `m`


class Model:
    """A run's parameters on this host's mesh, its tokenizer and template. See `load`."""

    def __init__(self, run: TrainedRun, tokenizer: Tokenizer | None):
        self.run, self.tokenizer = run, tokenizer
        self.config: ModelConfig = run.model_config
        self.template, self.image_mode = run.eval_config.template, run.eval_config.image_mode
        self.module = VisionLanguageModel(self.config)

    @property
    def params(self):
        return self.run.params

    @property
    def mesh(self):
        return self.run.mesh

    def __repr__(self):
        return (f"Model({self.run.path}, step {self.run.step}, M={self.config.num_queries}, "
                f"{self.config.query.variant}, template {self.template})")

    # ---- inputs ----
    def image(self, image) -> np.ndarray:
        """An image as the vision tower takes it [S, S, 3]: from a PIL image, a path, encoded
        bytes or an [H, W, 3] uint8 array (decoded with the same limits as training data)."""
        if isinstance(image, (str, os.PathLike, bytes)):
            image = open_image(image)
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"an image array must be [H, W, 3] uint8, got {image.shape} "
                                 f"{image.dtype}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise ValueError(f"an image is a PIL image, a path, bytes or a uint8 array, not "
                             f"{type(image).__name__}")
        return clip_preprocess(image, self.config.vision.image_size, self.image_mode)

    def prompt(self, question: str) -> splice.Example:
        """A question in the run's template, ending where the answer begins."""
        if self.tokenizer is None:
            raise ValueError(f"{self.run.path}: the run's config names no tokenizer "
                             f"(EvalConfig.tokenizer_dir), so it cannot read prompts")
        return encode_prompt(question, self.template, self.tokenizer)

    def _rows(self, images, prompts, m):
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if isinstance(m, str):
            raise ValueError(f"m={m!r}: an int, one per row, or 'auto'")
        m = per_row(self.config.num_queries if m is None else m, len(prompts))
        self.config.check_m(m)
        return (np.stack([self.image(i) for i in images]), [self.prompt(p) for p in prompts],
                [int(k) for k in m])

    def _batch_size(self, rows: int) -> int:
        """Rows per compiled batch: a power of two (so few shapes compile), at least the
        mesh's batch divisor, at most 64."""
        divisor = sharding.batch_divisor(self.mesh)
        size = max(divisor, 1 << max(rows - 1, 0).bit_length())
        return -(-min(size, max(64, divisor)) // divisor) * divisor

    # ---- generation ----
    def generate(self, images, prompts, m: int | Sequence[int] | str | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), seed: int = 0, details: bool = False,
                 policy: str | Escalate | Router = "escalate"):
        """Answers, one per (image, prompt) row (a single image and prompt give a list of
        one). m: one for every row or one per row (default M), or "auto": each row's m chosen
        by `policy`: "escalate" or "router", as `mqt-jax eval --m auto` calibrated them and
        saved them with the run (policy.json, router.json), or an `Escalate` or `Router` of
        your own. details: `Answer`s with the token ids, their log-probabilities and the m
        each row used (and, for m="auto", every m tried) instead of texts."""
        auto = isinstance(m, str) and m == "auto"
        if auto:
            chooser = self.policy(policy)
        images, examples, m = self._rows(images, prompts, None if auto else m)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed)
        generator = self._generator(sampling, len(examples))
        stops = stop_tokens(self.tokenizer, sampling.stop, self.config.llm.vocab_size)
        if auto and isinstance(chooser, Router):  # one vision pass: the features, then the answer
            visual = generator.visual_tokens(images)
            chosen = chooser.route(router_features(self._embedding, visual, examples,
                                                   chooser.ladder[0]))
            rows = generator.generate(examples, images, chosen, stops, visual)
        elif auto:
            rows = generator.escalate(examples, images, chooser.ladder, chooser.accept, stops)
        else:
            rows = generator.generate(examples, images, m, stops)
        texts = [cut_at_stop(self.tokenizer.decode(g.ids), sampling.stop).strip() for g in rows]
        if not details:
            return texts
        logprobs = self.token_logprobs(images, examples, [g.ids for g in rows], [g.m for g in rows])
        return [Answer(text, list(g.ids), g.m, lp.tolist(), g.tried)
                for text, g, lp in zip(texts, rows, logprobs)]

    def policy(self, policy: str | Escalate | Router = "escalate") -> Escalate | Router:
        """The policy that chooses m per query: an `Escalate` or `Router` as given, or the one
        `mqt-jax eval --m auto` calibrated and saved with the run ("escalate", "router")."""
        if isinstance(policy, Router):
            return policy.check(self.config)
        if isinstance(policy, Escalate):
            self.config.check_m(list(policy.ladder))
            return policy
        if policy == "oracle":
            raise ValueError("policy 'oracle' needs the right answer: it exists in evaluation "
                             "only (`mqt-jax eval --m auto`)")
        if policy not in ("escalate", "router"):
            raise ValueError(f"policy {policy!r}: expected 'escalate', 'router', an Escalate or "
                             f"a Router")
        if not splice.tokens_reusable(self.config) or not self.config.has_m:
            raise ValueError(f"m='auto' needs nested tokens that serve every m, which the "
                             f"{self.config.query.variant!r} compressor does not have")
        saved = Path(self.run.path) / ("policy.json" if policy == "escalate" else "router.json")
        if not saved.exists():
            raise ValueError(f"{saved} does not exist: calibrate one with `mqt-jax eval --workdir "
                             f"{self.run.path} --m auto` (or pass policy=Escalate(...))")
        if policy == "router":
            return Router.load(saved).check(self.config)
        chosen = Escalate.load(saved)
        self.config.check_m(list(chosen.ladder))
        return chosen

    @functools.cached_property
    def _embedding(self) -> np.ndarray:
        """The LLM's input embedding table on the host, once (what a router's features read)."""
        return embedding_table(self.params)

    def _generator(self, sampling: SamplingConfig, rows: int) -> Generator:
        """A Generator per call (cheap: the parameters are placed, the compiled steps are
        shared by every Generator), so a seed gives the same draws on every call."""
        return Generator(self.config, self.params, self.mesh, self.tokenizer.eos_id, sampling,
                         batch_size=self._batch_size(rows))

    # ---- the visual tokens and scores ----
    def visual_tokens(self, images, m: int | Sequence[int] | None = None) -> np.ndarray:
        """The compressor's tokens [N, M, hidden] per image (all M; the LLM reads the first
        m). For a qformer with prefix masks they depend on m: give it (default M)."""
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        m = per_row(self.config.num_queries if m is None else m, len(images))
        self.config.check_m(m)
        pixels = np.stack([self.image(i) for i in images])
        if self.config.compressor.reads_question:
            raise ValueError(f"{self.config.query.variant}'s visual tokens depend on the question: "
                             f"use generate/score")
        with sharding.activate(self.mesh):
            out = _visual_tokens(self.module, self.params, jnp.asarray(pixels),
                                 jnp.asarray(m, jnp.int32))
        return np.asarray(jax.device_get(out))

    def score(self, images, prompts, answers: Sequence[str], m=None) -> np.ndarray:
        """log p(answer | image, prompt) per row at its m, summed over the answer's tokens
        (multiple-choice scoring by likelihood)."""
        images, examples, m = self._rows(images, prompts, m)
        if len(answers) != len(examples):
            raise ValueError(f"{len(answers)} answers for {len(examples)} prompts")
        answer_ids = [self.tokenizer.encode(" " + a.strip())[0].tolist() for a in answers]
        return np.array([lp.sum() for lp in self.token_logprobs(images, examples, answer_ids, m)])

    def token_logprobs(self, images: np.ndarray, examples: list[splice.Example],
                       continuations: list[list[int]], m: list[int]) -> list[np.ndarray]:
        """log p of each continuation token after its prompt (teacher forcing), per row."""
        rows = [splice.Example(list(e.tokens) + list(c), [splice.IGNORE] * len(e.tokens) + list(c))
                for e, c in zip(examples, continuations)]
        lengths = [splice.true_length(r, [k]) for r, k in zip(rows, m)]
        seq_len = -(-max(lengths) // 16) * 16
        size = self._batch_size(len(rows))
        out = []
        with sharding.activate(self.mesh):
            for start in range(0, len(rows), size):
                idx = list(range(start, min(start + size, len(rows))))
                pad = idx + [idx[-1]] * (size - len(idx))
                laid = splice.layout_rows([[rows[i]] for i in pad],
                                          np.array([[m[i]] for i in pad], np.int32),
                                          self.config.num_queries, seq_len)
                batch = {"images": images[pad][:, None].astype(np.float32),
                         "m": np.array([[m[i]] for i in pad], np.int32), **laid}
                placed = jax.device_put(batch, sharding.batch_sharding(self.mesh))
                nll = np.asarray(jax.device_get(_nll(self.module, self.params, placed)))
                for j, i in enumerate(idx):
                    mask = laid["loss_mask"][j] > 0
                    out.append(-nll[j][mask])
        return out


_visual_tokens = jax.jit(vision_pass, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _nll(module: VisionLanguageModel, params, batch: dict):
    logits = module.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS))
    return token_nll(logits, batch["targets"], batch["loss_mask"])


def load(path: str | os.PathLike, step: int | None = None, gin_files: Sequence[str] = (),
         gin_params: Sequence[str] = (), check=None) -> Model:
    """The run in `path`: a training workdir, a recipe's workdir (its final stage), a
    checkpoints/ folder, or a `mqt-jax convert` output (without a tokenizer it serves
    visual_tokens only). Its own config.gin rebuilds the
    model (gin is cleared first; `gin_files` / `gin_params` go on top, e.g. a MeshConfig);
    `check(model_config)` runs before any parameter is read. step: default the latest."""
    run = load_run(path, step, gin_files, gin_params, check)
    return Model(run, run.tokenizer())
