"""Generation at any m with a preallocated KV cache: prefill the prompts, then decode one
token per step (greedy, or temperature / top-p sampling) until every row has produced EOS, a
token holding a stop string, or max_new_tokens.

Prompts are laid out by `splice.layout_rows` (one per row, right-padded, positions from 0), so
a prompt at m holds exactly m visual tokens: a smaller m is a shorter prefill. `Generator`
runs batches of requests sharded over a mesh (parameters as in training, rows over data x
fsdp), sorted by length and padded to bucketed lengths: one compilation per bucket, whatever
the requests and their m.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mqt_jax.config import ModelConfig, SamplingConfig
from mqt_jax.core import sharding, splice
from mqt_jax.models.llama import Llama
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel


def next_token(logits, temperature, top_p, key):
    """logits [B, V] -> token ids [B]: argmax where temperature == 0, else a sample from the
    top-p nucleus of softmax(logits / temperature). temperature, top_p: scalars or one per
    row; key: one key, or one per row [B] (a row's draw then depends on its own key alone).
    All traced: no recompilation; a batch without a sampling row skips the sort (a cond)."""
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits.shape[:1])
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits.shape[:1])
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)

    def sample(_):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
        ranked = jnp.sort(scaled, -1)[:, ::-1]
        probs = jax.nn.softmax(ranked, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the tokens ranked above each one
        kept = jnp.where(before < top_p[:, None], ranked, jnp.inf).min(-1, keepdims=True)  # the top one always
        nucleus = jnp.where(scaled >= kept, scaled, -jnp.inf)
        if key.ndim:
            sampled = jax.vmap(jax.random.categorical)(key, nucleus)
        else:
            sampled = jax.random.categorical(key, nucleus)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)


def _decode(model: VisionLanguageModel, max_new_tokens: int, params, logits, cache, eos_id,
            stops, temperature, top_p, key) -> dict:
    """From the prefill's last logits [B, V] and its cache, decode until every row has ended
    -> {"ids": [B, max_new_tokens] (EOS repeated after a row's first EOS or first token where
    `stops` [V] is true), "logprobs": log p of each token (temperature 1), "margin": the first
    token's log-probability lead over the runner-up [B]}, replicated."""
    first = next_token(logits, temperature, top_p, jax.random.fold_in(key, 0))
    logp = lambda logits, token: jnp.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], 1)[:, 0]
    top2 = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), 2)[0]
    cache = Llama.stacked(cache)
    out = jnp.full((first.shape[0], max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
    lps = jnp.zeros(out.shape, jnp.float32).at[:, 0].set(logp(logits, first))

    def more(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~done.all()

    def decode(carry):
        step, out, lps, cache, done = carry
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # [B, 1]
        logits, cache = model.apply({"params": params}, previous, cache,
                                    method="decode_in_place")
        token = next_token(logits[:, 0], temperature, top_p, jax.random.fold_in(key, step))
        token = jnp.where(done, eos_id, token)
        lp = jnp.where(done, 0.0, logp(logits[:, 0], token))
        return (step + 1, out.at[:, step].set(token), lps.at[:, step].set(lp), cache,
                done | ends(token))

    ends = lambda token: (token == eos_id) | stops[token]  # noqa: E731
    _, out, lps, _, _ = jax.lax.while_loop(more, decode, (1, out, lps, cache, ends(first)))
    every_host = lambda x: jax.lax.with_sharding_constraint(x, P())  # noqa: E731
    return {"ids": every_host(out), "logprobs": every_host(lps),
            "margin": every_host(top2[:, 0] - top2[:, 1])}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model: VisionLanguageModel, max_new_tokens: int, cache_len: int, keep_cache: bool,
              params, prompts: dict, eos_id, stops, temperature, top_p, key):
    """prompts: the MODEL_INPUTS arrays [B, T] -> `_decode`'s dict; with keep_cache, also
    the prefill's "cache" of `cache_len` slots (for `_generate_more`). With a "visual" entry
    [B, M, hidden] (tokens computed before), "images" is not needed. Inputs arrive placed:
    jit takes their shardings, and its cache (shared by every Generator) keys on them and on
    the shapes."""
    inputs = [prompts.get(k) for k in MODEL_INPUTS]
    logits, cache = model.apply({"params": params}, *inputs, cache_len,
                                visual=prompts.get("visual"), last_only=True, method="prefill")
    out = _decode(model, max_new_tokens, params, logits[:, 0], cache, eos_id, stops,
                  temperature, top_p, key)
    return dict(out, cache=cache) if keep_cache else out


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _generate_more(model: VisionLanguageModel, max_new_tokens: int, params, cache, visual,
                   chunk: dict, start, eos_id, stops, temperature, top_p, key):
    """Raise m: the prefill cache of the prompts at a smaller m keeps slots 0 .. start - 1
    (text before the image and the visual tokens both m share); the chunk (splice.raised_rows)
    fills in the rest at the larger m, then decoding runs as in `_generate`. Returns the same
    dict with the extended "cache" (for a further raise)."""
    logits, cache = model.apply({"params": params}, visual, chunk["token_ids"],
                                chunk["visual_index"], chunk["positions"], chunk["segment_ids"],
                                cache, start, method="extend")
    out = _decode(model, max_new_tokens, params, logits[:, 0], cache, eos_id, stops,
                  temperature, top_p, key)
    return dict(out, cache=cache)


@jax.jit
def _take_rows(cache: dict, rows):
    """The rows `rows` of a cache ([L, B, ...] leaves) as a batch of their own."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=1), cache)


def vision_pass(module: VisionLanguageModel, params, images, m):
    """images [N, H, W, 3], m [N] -> all M visual tokens [N, M, hidden] (the one vision pass
    the Generator, the API and the engine jit)."""
    return module.apply({"params": params}, images, m, method="visual_tokens")


@functools.partial(jax.jit, static_argnums=0)
def _prefill_logits(model: VisionLanguageModel, params, prompts: dict):
    return model.apply({"params": params}, *(prompts[k] for k in MODEL_INPUTS))


def prompt_batch(examples: list[splice.Example], images: np.ndarray, m, num_queries: int,
                 seq_len: int) -> dict[str, np.ndarray]:
    """One prompt per row, each at its m (an int for every row, or one per row); images
    [B, H, W, 3]."""
    m_rows = np.broadcast_to(np.asarray(m, np.int32), (len(examples),)).reshape(-1, 1)
    lengths = [splice.true_length(e, m_rows[i]) for i, e in enumerate(examples)]
    if max(lengths) > seq_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"a prompt of {lengths[i]} tokens at m={int(m_rows[i, 0])} does not fit "
                         f"seq_len={seq_len}")
    laid = splice.layout_rows([[e] for e in examples], m_rows, num_queries, seq_len)
    return {"images": images[:, None].astype(np.float32), "m": m_rows,
            **{k: laid[k] for k in MODEL_INPUTS[2:]}}  # token_ids ... question_end


def cut_at_eos(ids: np.ndarray, eos_id: int) -> list[list[int]]:
    out = []
    for row in np.asarray(ids).tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


@functools.lru_cache(maxsize=8)
def stop_tokens(tokenizer, stop: tuple[str, ...], vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: the tokens whose own text holds a stop string. A row that produces
    one has that stop in its text by then, so decoding can end there with the same answer;
    a stop spread over several tokens is only cut from the text afterwards."""
    found = np.zeros(vocab_size, bool)
    for i in range(min(vocab_size, tokenizer.vocab_size)) if any(stop) else ():
        text = tokenizer.decode([i])
        found[i] = any(s and s in text for s in stop)
    return found


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def per_row(m, rows: int) -> np.ndarray:
    """m as one int per row: an int repeated, or a sequence of `rows` values."""
    m = np.asarray(m)
    if m.ndim == 0:
        return np.full(rows, m, m.dtype)
    if m.shape != (rows,):
        raise ValueError(f"m has {m.size} values for {rows} rows: give one m, or one per row")
    return m


@dataclasses.dataclass(frozen=True)
class Generated:
    """One answer: its token ids (up to, not including, EOS), their log-probabilities
    (temperature 1), that of the EOS that ended it (None when it ran to max_new_tokens or a
    stop token), the first token's log-probability lead over the runner-up, the m it was
    answered at and, escalated, every m tried on the way."""

    ids: list[int]
    logprobs: list[float]
    eos_logprob: float | None
    margin: float
    m: int
    tried: tuple[int, ...]


class Generator:
    """Batched, sharded generation at any m (1 <= m <= M, checked on every call), one per
    call or one per request.

    Requests are sorted by prompt length and cut into batches of `batch_size` rows, each
    padded to the next multiple of `bucket` tokens: the generate function compiles once per
    bucket length (jax's cache keys on shapes), never per request or per m."""

    def __init__(self, model_config: ModelConfig, params, mesh, eos_id: int,
                 sampling: SamplingConfig = SamplingConfig(), batch_size: int = 16,
                 bucket: int = 16):
        if batch_size % sharding.batch_divisor(mesh):
            raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's data x fsdp "
                             f"= {sharding.batch_divisor(mesh)} devices")
        self.model_config, self.mesh, self.eos_id = model_config, mesh, eos_id
        self.sampling, self.batch_size, self.bucket = sampling, batch_size, bucket
        self.model = VisionLanguageModel(model_config)
        whole = lambda x: isinstance(x, jax.Array) and x.sharding.num_devices == mesh.size  # noqa: E731
        param_sh = jax.tree.map(lambda x: x.sharding if whole(x) else sharding.replicated(mesh), params)
        self.params = jax.device_put(params, param_sh)  # unplaced (host) parameters: replicated
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._vision = jax.jit(functools.partial(vision_pass, self.model),
                               out_shardings=sharding.replicated(mesh))
        self.vision_passes = 0  # images run through the vision tower and query transformer
        self._calls = 0

    def batches(self, prompts: list[splice.Example], images: np.ndarray, m, visual=None):
        """(row indices, placed batch) in order of prompt length; the last batch repeats its
        last request to fill `batch_size` rows. m: one for every row, or one per row (rows
        of one batch may differ: m is data). visual: the rows' tokens from `visual_tokens`
        (then the batches carry them instead of the images)."""
        if len(prompts) != len(images) or (visual is not None and len(visual) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images"
                             + ("" if visual is None else f" and {len(visual)} visual tokens"))
        m = per_row(m, len(prompts))
        self.model_config.check_m(m)
        lengths = np.array([splice.true_length(p, [k]) for p, k in zip(prompts, m)])
        if self.sampling.max_new_tokens >= self.model_config.llm.max_length:
            raise ValueError(f"max_new_tokens={self.sampling.max_new_tokens}: the model takes "
                             f"{self.model_config.llm.max_length} tokens in all, prompt included "
                             f"(LLMConfig.max_length)")
        limit = self.model_config.llm.max_length - self.sampling.max_new_tokens
        if lengths.size and lengths.max() > limit:
            i = int(lengths.argmax())
            raise ValueError(f"prompt {i} is {lengths[i]} tokens at m={m[i]}; with max_new_tokens="
                             f"{self.sampling.max_new_tokens} the model takes at most {limit} "
                             f"(LLMConfig.max_length={self.model_config.llm.max_length})")
        order = np.argsort(lengths, kind="stable")
        rows = sharding.process_rows(self.mesh, self.batch_size)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])])
            seq_len = -(-lengths[idx].max() // self.bucket) * self.bucket
            batch = prompt_batch([prompts[i] for i in idx], images[idx], m[idx],
                                 self.model_config.num_queries, seq_len)
            if self.model_config.dropped_per_image:
                splice.check_survivors(batch, self.model_config.num_queries,
                                       self.model_config.dropped_per_image)
            if visual is not None:
                del batch["images"]
                batch["visual"] = visual[idx]
            yield idx, {k: jax.make_array_from_process_local_data(self.batch_sharding, v[rows])
                        for k, v in batch.items()}

    def generate(self, prompts: list[splice.Example], images: np.ndarray, m,
                 stops: np.ndarray | None = None, visual=None) -> list[Generated]:
        """A `Generated` per prompt. images [N, H, W, 3]; m: one, or one per prompt; stops [V]:
        tokens that end a row (see `stop_tokens`); visual: the images' tokens from
        `visual_tokens`, to skip the vision pass."""
        out = [None] * len(prompts)
        m = per_row(m, len(prompts))
        with sharding.activate(self.mesh):
            if visual is None:
                self.vision_passes += len(prompts)  # (each batch runs its rows' images)
            for idx, batch in self.batches(prompts, images, m, visual):
                seq_len = batch["token_ids"].shape[1]
                got = self._run(_generate, self.sampling.max_new_tokens,
                                seq_len + self.sampling.max_new_tokens, False, self.params, batch,
                                stops=stops)
                for i, row in zip(idx, self._rows(got, m[idx], stops)):
                    out[i] = row
        return out

    def __call__(self, prompts, images, m, stops=None, visual=None) -> list[list[int]]:
        """Generated token ids per prompt (up to, not including, EOS; up to and including the
        first token where `stops` [V] is true); see `generate`."""
        return [g.ids for g in self.generate(prompts, images, m, stops, visual)]

    def texts(self, prompts, images, m, tokenizer, visual=None) -> list[str]:
        """Decoded answers, each cut before the first stop string."""
        return [self.text(g.ids, tokenizer) for g in
                self.generate(prompts, images, m, self.stops(tokenizer), visual)]

    def stops(self, tokenizer) -> np.ndarray:
        return stop_tokens(tokenizer, self.sampling.stop, self.model_config.llm.vocab_size)

    def text(self, ids: list[int], tokenizer) -> str:
        return cut_at_stop(tokenizer.decode(ids), self.sampling.stop).strip()

    def _run(self, fn, *args, stops=None) -> dict:
        """fn (`_generate` or `_generate_more`) with the sampling settings and a fresh key."""
        s = self.sampling
        if stops is None:
            stops = np.zeros(self.model_config.llm.vocab_size, bool)
        key = jax.random.fold_in(jax.random.key(s.seed), self._calls)
        self._calls += 1
        return fn(self.model, *args, self.eos_id, stops, s.temperature, s.top_p, key)

    def _rows(self, got: dict, m, stops=None) -> list[Generated]:
        ids, lps, margin = (np.asarray(jax.device_get(got[k])) for k in ("ids", "logprobs", "margin"))
        rows = []
        for row, tokens in enumerate(cut_at_eos(ids, self.eos_id)):
            n = len(tokens)
            ended = n < ids.shape[1] and not (n and stops is not None and stops[tokens[-1]])
            rows.append(Generated(tokens, lps[row, :n].tolist(),
                                  float(lps[row, n]) if ended else None, float(margin[row]),
                                  int(m[row]), (int(m[row]),)))
        return rows

    def escalate(self, prompts: list[splice.Example], images: np.ndarray, ladder: list[int],
                 accept: Callable[[Generated], bool], stops: np.ndarray | None = None,
                 ) -> list[Generated]:
        """Each prompt answered up a ladder of m (increasing), stopping at the first answer
        that `accept` takes (else the last rung's). One vision pass per image; each raise
        keeps the prefill cache of [text before the image, the visual tokens the smaller m
        had] and computes only the added visual tokens and the text after them
        (`_generate_more`), so the answer at each rung is the one a fresh prefill there gives.
        A row's `tried` lists its rungs. Only the rows that climb go on: their caches are
        gathered into a smaller batch (a power of two times the batch devices, so few shapes
        compile); FLOPs are a row's own (`flops.escalation_prefill_flops`)."""
        ladder = [int(k) for k in ladder]
        self.model_config.check_m(ladder)
        if ladder != sorted(set(ladder)):
            raise ValueError(f"ladder {ladder}: m must increase along it")
        top, new = ladder[-1], self.sampling.max_new_tokens
        longest = np.array([splice.true_length(p, [top]) for p in prompts])
        if longest.size and longest.max() + new > self.model_config.llm.max_length:
            i = int(longest.argmax())
            raise ValueError(f"prompt {i} is {longest[i]} tokens at m={top}; with max_new_tokens="
                             f"{new} it exceeds LLMConfig.max_length="
                             f"{self.model_config.llm.max_length}")
        visual = self.visual_tokens(images)
        out = [None] * len(prompts)
        bucket = lambda n: -(-int(n) // self.bucket) * self.bucket  # noqa: E731
        image_at = np.array([list(p.tokens).index(splice.IMAGE_TOKEN) for p in prompts])

        def raise_plan(idx, prev, m):  # the chunk's padded length, and where it starts per row
            starts = image_at[idx] + prev
            ends = np.array([splice.true_length(prompts[i], [m]) for i in idx])
            return bucket((ends - starts).max()), starts

        def put(x):  # rows of a batch of any size the mesh divides
            rows = sharding.process_rows(self.mesh, len(x))
            return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)[rows])
        with sharding.activate(self.mesh):
            for idx, batch in self.batches(prompts, images, ladder[0], visual):
                # Room for every raise's padded chunk (written whole at its rows' starts) and
                # for decoding after the longest prompt.
                needs = [plan[1].max() + plan[0] for plan in
                         (raise_plan(idx, prev, m) for prev, m in zip(ladder, ladder[1:]))]
                cache_len = max([bucket(longest[idx].max())] + needs) + new
                got = self._run(_generate, new, cache_len, True, self.params, batch, stops=stops)
                answers = self._rows(got, [ladder[0]] * len(idx), stops)
                cache, at = got["cache"], np.arange(len(idx))  # each row's place in the cache
                real = [r for r, i in enumerate(idx) if list(idx).index(i) == r]  # not padding
                for prev, m in zip(ladder, ladder[1:]):
                    climbing = [r for r in real if not accept(answers[r])]
                    if not climbing:
                        break
                    # Only the rows that climb go on, as a smaller batch; padding repeats the last.
                    n = sharding.group_rows(self.mesh, len(climbing), len(idx))
                    pick = climbing + [climbing[-1]] * (n - len(climbing))
                    cache = _take_rows(cache, at[pick])
                    at[climbing] = np.arange(len(climbing))
                    chunk_len, start = raise_plan(idx[pick], prev, m)
                    chunk, start = splice.raised_rows([prompts[i] for i in idx[pick]], prev, m,
                                                      self.model_config.num_queries, chunk_len)
                    got = self._run(_generate_more, new, self.params, cache, put(visual[idx[pick]]),
                                    {k: put(v) for k, v in chunk.items()}, put(start), stops=stops)
                    cache = got["cache"]
                    raised = self._rows(got, [m] * n, stops)
                    for j, r in enumerate(climbing):
                        answers[r] = dataclasses.replace(raised[j], tried=answers[r].tried + (m,))
                for r in real:
                    out[idx[r]] = answers[r]
        return out

    def visual_tokens(self, images: np.ndarray) -> np.ndarray:
        """All M visual tokens of each image [N, M, hidden], for a model whose tokens serve
        every m and prompt (`splice.tokens_reusable`): an m-sweep passes them to every m's
        call instead of running the vision tower and query transformer once per m. Equal
        images (the same question image, byte for byte) are run once."""
        if not splice.tokens_reusable(self.model_config):
            raise ValueError(f"the {self.model_config.query.variant!r} compressor's tokens "
                             f"depend on m or on the question: they cannot be computed once")
        slot, inverse, picks = {}, [], []  # digest -> distinct index; row -> it; its first row
        for row, image in enumerate(images):
            digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
            if digest not in slot:
                slot[digest] = len(picks)
                picks.append(row)
            inverse.append(slot[digest])
        distinct = images[picks]
        rows = sharding.process_rows(self.mesh, self.batch_size)
        big_m = np.full(self.batch_size, self.model_config.num_queries, np.int32)
        out = []
        with sharding.activate(self.mesh):
            for start in range(0, len(distinct), self.batch_size):
                chunk = distinct[start:start + self.batch_size].astype(np.float32)
                pad = self.batch_size - len(chunk)  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
                put = lambda x: jax.make_array_from_process_local_data(  # noqa: E731
                    self.batch_sharding, x[rows])
                tokens = self._vision(self.params, put(chunk), put(big_m))
                out.append(np.asarray(jax.device_get(tokens))[: self.batch_size - pad])
        self.vision_passes += len(distinct)
        return np.concatenate(out)[np.asarray(inverse)]

    def prefill_seconds(self, prompts, images, m: int, repeats: int = 3) -> float:
        """Median wall time of one batch's prefill (the forward over prompt + m visual tokens)
        at m, after a warm-up call that compiles it."""
        with sharding.activate(self.mesh):
            _, batch = next(self.batches(prompts[: self.batch_size], images[: self.batch_size], m))
            jax.block_until_ready(_prefill_logits(self.model, self.params, batch))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(_prefill_logits(self.model, self.params, batch))
                times.append(time.perf_counter() - start)
        return float(np.median(times))
