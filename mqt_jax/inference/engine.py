"""Continuous batching: a fixed number of decode slots over one preallocated KV cache;
requests enter between decode steps and leave when done, each at its own m.

Three jitted steps, named as in JetStream: `prefill` (a group of prompts of one length bucket,
rows at any m -> each row's first token and its keys and values), `insert` (those into free
slots) and `decode` (one token for every slot, the cache updated where it lies). Shapes are
static: prefill and insert compile once per (length bucket, group size: the batch devices
times a power of two, up to prefill_batch), decode once; never per request or per m (m is
data: `mqt_jax.core.splice`).

Vision cache: the compressor's M tokens of an image, kept on the host (LRU, bounded in bytes,
keyed by a hash of the preprocessed pixels). Where token i does not depend on m (the official
resampler, a qformer with causal queries, the fixed-token projectors) one entry serves every
m, so the same image at another m costs no vision pass; otherwise the key adds m.

`Engine.step` is the whole schedule (admit, prefill + insert, decode, deliver); a server runs
it in a thread (`Engine.start`), tests and benchmarks call `Engine.run` directly.

Several processes (one per host): process 0 holds the queue and decides each step (which
slots its cancellations free, which requests enter which slots) and broadcasts that plan; every
other process runs `Engine.follow`, so all take the same jitted steps on the same data. The
rest is deterministic given the plan (tokens come back replicated; EOS, stop tokens and
lengths end rows alike everywhere; the vision caches see the same keys in the same order).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import itertools
import threading
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mqt_jax.config import EngineConfig
from mqt_jax.core import sharding, splice
from mqt_jax.inference.generate import next_token, vision_pass
from mqt_jax.models.llama import Llama
from mqt_jax.models.vlm import VisionLanguageModel


class QueueFull(Exception):
    """The engine holds max_queue waiting requests (a server answers 429)."""


class Stopped(Exception):
    """The engine admits nothing more: it is draining or stopped (a server answers 503)."""


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt at its m. `emit(token, finish)` is called on the engine's thread for each
    generated token (finish None), then once with token None and finish "stop" (EOS or a stop
    token), "length" (max_new_tokens), "cancelled" or "error" (the engine failed)."""

    prompt: splice.Example  # at most one <image> placeholder
    image: np.ndarray | None  # [S, S, 3] preprocessed (Model.image); None: text only
    m: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset = frozenset()  # tokens whose text holds a stop string: the row ends
    stop: tuple[str, ...] = ()  # the stop strings themselves (a server cuts the text at them)
    emit: Callable | None = None
    # Set by the engine:
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    tokens: list = dataclasses.field(default_factory=list)
    finish: str | None = None
    submitted: float = 0.0
    first_token_at: float = 0.0
    done_at: float = 0.0
    cancelled: bool = False
    prompt_len: int = 0  # in the LLM's sequence: text + m visual tokens

    @property
    def has_image(self) -> bool:
        return self.prompt.num_images > 0


class VisionCache:
    """LRU of visual tokens [M, hidden] on the host, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # the engine's thread and the server's workers (a router)

    def get(self, key):
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
            self.misses += 1
            return None

    def put(self, key, tokens: np.ndarray) -> None:
        with self._lock:
            if tokens.nbytes > self.max_bytes or key in self.entries:
                return
            self.entries[key] = tokens
            self.bytes += tokens.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes


# ---- the jitted steps (module-level: the model is static, so compiled code is shared) ----

def _row_keys(seeds, counts):
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counts)


def _prefill(module: VisionLanguageModel, params, visual, prompts, sampling):
    """A group of prompts [P, T] with their visual tokens [P, M, hidden] -> (first tokens
    [P], keys and values [L, P, T, ...] and each layer's index [L, P])."""
    logits, kv = module.apply(
        {"params": params}, None, prompts["m"], prompts["token_ids"], prompts["visual_index"],
        prompts["positions"], prompts["segment_ids"], prompts["question_end"],
        prompts["token_ids"].shape[1], visual=visual, last_only=True, method="prefill")
    keys = _row_keys(sampling["seed"], jnp.zeros_like(sampling["seed"]))
    return next_token(logits[:, 0], sampling["temperature"], sampling["top_p"], keys), kv


def _insert(state, kv, first, slot, sampling):
    """Prefilled rows into the slots `slot` [P] (padding rows carry slot = slots: dropped)."""
    kv, t = Llama.stacked(kv), kv["k"].shape[2]
    put = lambda a, x: a.at[:, slot, :, :t].set(x.astype(a.dtype), mode="drop")  # noqa: E731
    row = lambda a, x: a.at[slot].set(x, mode="drop")  # noqa: E731
    return dict(state, k=put(state["k"], kv["k"]), v=put(state["v"], kv["v"]),
                index=state["index"].at[:, slot].set(kv["index"], mode="drop"),
                tokens=row(state["tokens"], first), count=row(state["count"], jnp.ones_like(first)),
                **{k: row(state[k], v) for k, v in sampling.items()})


def _decode(module: VisionLanguageModel, params, state, live):
    """One token for every slot (live [slots]: the rows in use, whose lengths bound the
    slots attention reads); returns (state, the tokens [slots])."""
    cache = {k: state[k] for k in ("k", "v", "index")}
    cache["span"] = jnp.where(live, state["index"][0], 0).max() + 1
    logits, cache = module.apply({"params": params}, state["tokens"][:, None], cache,
                                 method="decode_in_place")
    keys = _row_keys(state["seed"], state["count"])
    token = next_token(logits[:, 0], state["temperature"], state["top_p"], keys)
    return dict(state, **cache, tokens=token, count=state["count"] + 1), token


class Engine:
    """Continuous batching over `model` (an `mqt_jax.inference.api.Model`); see the module docstring."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), eos_id: int | None = None):
        """eos_id: default the model's tokenizer's (-1: never stop at one, for benchmarks)."""
        cfg = model.config
        if cfg.compressor.reads_question:
            raise ValueError(f"the engine serves compressors whose visual tokens depend on the "
                             f"image alone; {cfg.query.variant}'s depend on the question: use "
                             f"Model.generate")
        divisor = sharding.batch_divisor(model.mesh)
        if config.slots % divisor:
            raise ValueError(f"EngineConfig.slots={config.slots} is not a multiple of the mesh's "
                             f"data x fsdp = {divisor} devices")
        self.model, self.config = model, config
        self.eos_id = model.tokenizer.eos_id if eos_id is None else eos_id
        self.cache_len = min(config.cache_len, cfg.llm.max_length)
        self.prefill_rows = -(-config.prefill_batch // divisor) * divisor
        self.nested = splice.tokens_reusable(cfg)
        self.vision_cache = VisionCache(int(config.vision_cache_mb * 2**20))
        mesh, rows = model.mesh, sharding.BATCH_AXES
        self._batch = sharding.batch_sharding(mesh)
        llm = cfg.llm
        shape = (llm.num_layers, config.slots, llm.num_kv_heads, self.cache_len, llm.head_dim)
        per_slot = NamedSharding(mesh, P(rows))
        self._state_sharding = {"k": NamedSharding(mesh, P(None, rows)),
                                "v": NamedSharding(mesh, P(None, rows)),
                                "index": NamedSharding(mesh, P(None, rows)),
                                **{k: per_slot for k in ("tokens", "count", "temperature",
                                                          "top_p", "seed")}}
        dtype = jnp.dtype(cfg.dtype)
        zeros = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),  # noqa: E731
                         "index": jnp.zeros(shape[:2], jnp.int32),
                         "tokens": jnp.zeros(config.slots, jnp.int32),
                         "count": jnp.zeros(config.slots, jnp.int32),
                         "temperature": jnp.zeros(config.slots, jnp.float32),
                         "top_p": jnp.ones(config.slots, jnp.float32),
                         "seed": jnp.zeros(config.slots, jnp.uint32)}
        self.state = jax.jit(zeros, out_shardings=self._state_sharding)()  # made in place
        module = model.module
        replicated = sharding.replicated(mesh)
        self._vision_fn = jax.jit(functools.partial(vision_pass, module), out_shardings=replicated)
        # the first tokens come back replicated: every process reads them
        self._prefill_fn = jax.jit(functools.partial(_prefill, module),
                                   out_shardings=(replicated, None))
        self._insert_fn = jax.jit(_insert, donate_argnums=0,
                                  out_shardings=self._state_sharding)
        self._decode_fn = jax.jit(functools.partial(_decode, module), donate_argnums=1,
                                  out_shardings=(self._state_sharding, replicated))
        self.live: list[Request | None] = [None] * config.slots
        self.queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._admitting, self._thread, self._released = True, None, False
        # Device work from one thread at a time (the schedule's, or a router's vision pass in a
        # server worker): programs with collectives launched from two threads could reach the
        # devices in different orders and wait on each other for ever.
        self._device = threading.Lock()
        self.stats = collections.Counter()  # prefills, decode_steps, tokens, finished_<reason>, ...
        self.leader = jax.process_index() == 0  # takes the requests; the others follow it

    # ---- admission (any thread) ----
    def check(self, request: Request) -> None:
        """A ValueError naming what is wrong with a request, before it is queued."""
        cfg = self.model.config
        cfg.check_m([request.m])
        if request.prompt.num_images > 1:
            raise ValueError(f"the prompt holds {request.prompt.num_images} images; the "
                             f"template takes one")
        if request.has_image != (request.image is not None):
            raise ValueError("a prompt with an <image> needs its image, and only then")
        if cfg.dropped_per_image and not request.has_image:
            raise ValueError(f"the {cfg.query.variant} model needs an image in every prompt")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ValueError(f"temperature={request.temperature} must be >= 0 and top_p="
                             f"{request.top_p} in (0, 1]")
        length = splice.true_length(request.prompt, [request.m])
        if length + request.max_new_tokens > self.cache_len:
            raise ValueError(f"the prompt is {length} tokens at m={request.m}; with max_tokens="
                             f"{request.max_new_tokens} it needs {length + request.max_new_tokens} "
                             f"of the {self.cache_len} the cache holds per request")
        request.prompt_len = length

    def submit(self, request: Request) -> Request:
        """Queue a request (checked first). Raises ValueError, QueueFull or Stopped."""
        self.check(request)
        with self._lock:
            if not self._admitting:
                raise Stopped("the server is shutting down")
            if len(self.queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting; try again later")
            request.submitted = time.perf_counter()
            self.queue.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): its slot frees at the next step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    @property
    def queue_length(self) -> int:
        return len(self.queue)

    @property
    def live_slots(self) -> int:
        return sum(r is not None for r in self.live)

    # ---- the schedule (the engine's thread) ----
    def step(self) -> bool:
        """Admit what fits, prefill and insert it, decode one token for every live slot and
        deliver it. Returns whether there was anything to do. Process 0 only (see `follow`)."""
        if not self.leader:
            raise RuntimeError("process 0 steps the engine; the other processes run follow()")
        with self._lock:
            for r in [r for r in self.queue if r.cancelled]:
                self.queue.remove(r)
                self._finish(r, "cancelled")
            freed = [slot for slot, r in enumerate(self.live) if r is not None and r.cancelled]
            for slot in freed:
                self._free(slot, "cancelled")
            admitted = self._admit()
        if jax.process_count() > 1:
            self._broadcast(encode_plan(freed, admitted))
        with self._device:
            return self._take_step(admitted)

    def follow(self) -> None:
        """On a process other than 0: take the steps process 0 broadcasts, until it stops."""
        while True:
            plan = decode_plan(self._broadcast(b""))
            if plan is None:
                return
            freed, admitted = plan
            for slot in freed:
                self.live[slot] = None
            for _, r in admitted:
                self.check(r)  # sets its prompt length
            self._take_step(admitted)

    def _broadcast(self, payload: bytes) -> bytes:
        """Process 0's payload, on every process (two broadcasts: its size, then the bytes
        padded to a power of two, so few shapes compile)."""
        size = int(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int32))[0])
        buffer = np.zeros(1 << max(10, (size - 1).bit_length()), np.uint8)
        buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
        return multihost_utils.broadcast_one_to_all(buffer)[:size].tobytes()

    def _take_step(self, admitted: list[tuple[int, Request]]) -> bool:
        if admitted:
            self._prefill_and_insert(admitted)
        if any(r is not None for r in self.live):
            self._decode_step()
            return True
        return bool(admitted)

    def _admit(self) -> list[tuple[int, Request]]:
        free = [s for s, r in enumerate(self.live) if r is None]
        policy = self.config.policy
        if not free or not self.queue or (policy == "static" and len(free) < len(self.live)):
            return []
        if policy == "per_m":
            live_m = {r.m for r in self.live if r is not None}
            m = live_m.pop() if live_m else self.queue[0].m
            chosen = [r for r in self.queue if r.m == m][: len(free)]
        else:
            chosen = list(itertools.islice(self.queue, len(free)))
        for r in chosen:
            self.queue.remove(r)
        return list(zip(free, chosen))

    def _group_rows(self, n: int) -> int:
        """Rows a group of n prompts (or images) runs as: the batch devices times a power of
        two, at most prefill_rows. A lone arrival is not padded to a full prefill (what
        continuous batching mostly sees), and few shapes compile."""
        return sharding.group_rows(self.model.mesh, n, self.prefill_rows)

    def _bucket(self, length: int) -> int:
        return min(-(-length // self.config.bucket) * self.config.bucket, self.cache_len)

    def _prefill_and_insert(self, admitted: list[tuple[int, Request]]) -> None:
        groups = collections.defaultdict(list)
        for slot, r in admitted:
            groups[self._bucket(r.prompt_len)].append((slot, r))
        for t, group in sorted(groups.items()):
            for start in range(0, len(group), self.prefill_rows):
                self._prefill_group(t, group[start:start + self.prefill_rows])

    def _prefill_group(self, t: int, group: list[tuple[int, Request]]) -> None:
        n, cfg = self._group_rows(len(group)), self.model.config
        requests = [r for _, r in group] + [group[-1][1]] * (n - len(group))
        slots = np.array([s for s, _ in group] + [self.config.slots] * (n - len(group)), np.int32)
        m = np.array([[r.m] for r in requests], np.int32)
        laid = splice.layout_rows([[r.prompt] for r in requests], m, cfg.num_queries, t)
        if cfg.dropped_per_image:
            splice.check_survivors({**laid, "m": m}, cfg.num_queries, cfg.dropped_per_image)
        prompts = {"m": m, **{k: laid[k] for k in ("token_ids", "visual_index", "positions",
                                                    "segment_ids", "question_end")}}
        sampling = {"temperature": np.array([r.temperature for r in requests], np.float32),
                    "top_p": np.array([r.top_p for r in requests], np.float32),
                    "seed": np.array([r.seed % 2**32 for r in requests], np.uint32)}
        put = self._put
        with sharding.activate(self.model.mesh):
            visual = put(self._visual_tokens(requests[: len(group)], n))
            first, kv = self._prefill_fn(self.model.params, visual, put(prompts), put(sampling))
            self.state = self._insert_fn(self.state, kv, first, put(slots), put(sampling))
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += n  # beyond the requests prefilled: padding
        first = np.asarray(jax.device_get(first))
        now = time.perf_counter()
        for (slot, r), token in zip(group, first[: len(group)]):
            self.live[slot] = r
            r.first_token_at = now
            self._deliver(slot, int(token))

    def _visual_tokens(self, requests: list[Request], rows: int) -> np.ndarray:
        """[rows, M, hidden] for a prefill group: from the vision cache, else one vision pass
        over the missing images (zeros for text-only and padding rows, which read none)."""
        cfg = self.model.config
        out = np.zeros((rows, cfg.num_queries, cfg.llm.hidden), np.float32)
        keys, missing = [], []
        for i, r in enumerate(requests):
            if not r.has_image:
                keys.append(None)
                continue
            keys.append(self._cache_key(r.image, r.m))
            cached = self.vision_cache.get(keys[-1]) if self.vision_cache.max_bytes else None
            if cached is None:
                missing.append(i)
            else:
                out[i] = cached
        if missing:
            tokens = self._vision_pass([requests[i].image for i in missing],
                                       [requests[i].m for i in missing])
            for j, i in enumerate(missing):
                out[i] = tokens[j]
                self.vision_cache.put(keys[i], tokens[j])
        return out

    def image_tokens(self, image: np.ndarray) -> np.ndarray:
        """One image's M visual tokens [M, hidden] (a nested model's, which serve every m),
        from the vision cache or a vision pass that fills it: what a router reads before its
        request is queued, and what that request's prefill then finds. Process 0 alone (a
        pass of its own would leave the other processes behind)."""
        if not self.nested or jax.process_count() > 1:
            raise ValueError("visual tokens ahead of a request need a nested model in one process")
        key = self._cache_key(image, None)
        cached = self.vision_cache.get(key) if self.vision_cache.max_bytes else None
        if cached is None:
            with self._device:
                cached = self._vision_pass([image], [self.model.config.num_queries])[0]
            self.vision_cache.put(key, cached)
        return cached

    def _cache_key(self, image: np.ndarray, m: int | None):
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()
        return digest if self.nested else (digest, m)

    def _vision_pass(self, images: list[np.ndarray], m: list[int]) -> np.ndarray:
        """The compressor's tokens [len(images), M, hidden], padded to few compiled shapes."""
        images, m = np.stack(images).astype(np.float32), np.array(m, np.int32)
        pad = self._group_rows(len(images)) - len(images)
        images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
        m = np.concatenate([m, np.repeat(m[-1:], pad)])
        with sharding.activate(self.model.mesh):
            tokens = self._vision_fn(self.model.params, self._put(images), self._put(m))
        self.stats["vision_passes"] += 1
        return np.asarray(jax.device_get(tokens))[: len(images) - pad]

    def _decode_step(self) -> None:
        with sharding.activate(self.model.mesh):
            live = self._put(np.array([r is not None for r in self.live]))
            self.state, tokens = self._decode_fn(self.model.params, self.state, live)
        tokens = np.asarray(jax.device_get(tokens))
        self.stats["decode_steps"] += 1
        for slot, r in enumerate(self.live):
            if r is not None:
                self._deliver(slot, int(tokens[slot]))

    def _put(self, tree):
        """Host arrays (the same on every process) whose first axis is rows -> global arrays
        split over the batch axes, each process giving the rows its devices hold."""
        def put(x):
            rows = sharding.process_rows(self.model.mesh, x.shape[0])
            return jax.make_array_from_process_local_data(self._batch, x[rows], x.shape)
        return jax.tree.map(put, tree)

    def _deliver(self, slot: int, token: int) -> None:
        r = self.live[slot]
        if token == self.eos_id:
            return self._free(slot, "stop")
        r.tokens.append(token)
        self.stats["tokens"] += 1
        if r.emit:
            r.emit(token, None)
        if token in r.stop_ids:
            self._free(slot, "stop")
        elif len(r.tokens) >= r.max_new_tokens:
            self._free(slot, "length")

    def _free(self, slot: int, finish: str) -> None:
        self._finish(self.live[slot], finish)
        self.live[slot] = None

    def _finish(self, r: Request, finish: str) -> None:
        r.finish, r.done_at = finish, time.perf_counter()
        self.stats["requests"] += 1
        self.stats["finished_" + finish] += 1
        if r.emit:
            r.emit(None, finish)

    # ---- running ----
    def run(self, requests: list[Request] | None = None) -> list[Request]:
        """Submit `requests` and step until nothing is queued or live (offline use)."""
        for r in requests or []:
            self.submit(r)
        while self.queue or any(r is not None for r in self.live):
            self.step()
        return requests or []

    def start(self) -> None:
        """Run the schedule in a background thread until `stop`."""
        self._thread = threading.Thread(target=self._loop, name="mqt-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not self.queue and not any(self.live)
                if idle and not self._admitting:
                    break
                if idle:  # an idle step each second: the other processes hear from us
                    self._lock.wait(timeout=1.0)
            try:
                self.step()
            except Exception:  # fail-stop: the donated state may be gone; end every request
                traceback.print_exc()
                with self._lock:
                    self._admitting = False
                    for slot, r in enumerate(self.live):
                        if r is not None:
                            self._free(slot, "error")
                    while self.queue:
                        self._finish(self.queue.popleft(), "error")
                break
        self._release_followers()

    def _release_followers(self) -> None:
        """Once: the followers have left after the first stop plan (a second would hang)."""
        if jax.process_count() > 1 and not self._released:
            self._released = True
            self._broadcast(encode_plan([], [], stop=True))

    @property
    def admitting(self) -> bool:
        return self._admitting

    def stop(self, timeout: float | None = None) -> None:
        """Admit nothing more, finish what is queued and running, end the thread."""
        with self._lock:
            self._admitting = False
            self._lock.notify()
        if self._thread:
            self._thread.join(timeout)
        elif self.leader:  # stepped by hand (run)
            self._release_followers()


# ---- the plan process 0 broadcasts each step (npz: arrays only, nothing to unpickle) ----

def encode_plan(freed: list[int], admitted: list[tuple[int, Request]], stop: bool = False) -> bytes:
    arrays = {"stop": np.array(stop), "freed": np.array(freed, np.int32),
              "slot": np.array([s for s, _ in admitted], np.int32)}
    for name, dtype in (("m", np.int32), ("max_new_tokens", np.int32),
                        ("temperature", np.float32), ("top_p", np.float32), ("seed", np.int64)):
        arrays[name] = np.array([getattr(r, name) % 2**32 if name == "seed" else getattr(r, name)
                                 for _, r in admitted], dtype)
    for i, (_, r) in enumerate(admitted):
        arrays[f"prompt{i}"] = np.asarray(r.prompt.tokens, np.int32)
        arrays[f"stop_ids{i}"] = np.array(sorted(r.stop_ids), np.int32)
        if r.image is not None:
            arrays[f"image{i}"] = np.asarray(r.image, np.float32)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def decode_plan(payload: bytes) -> tuple[list[int], list[tuple[int, Request]]] | None:
    """(freed slots, admitted (slot, request)), or None: stop."""
    plan = np.load(io.BytesIO(payload), allow_pickle=False)
    if plan["stop"]:
        return None
    admitted = []
    for i, slot in enumerate(plan["slot"].tolist()):
        tokens = plan[f"prompt{i}"].tolist()
        image = plan[f"image{i}"] if f"image{i}" in plan.files else None
        admitted.append((slot, Request(
            splice.Example(tokens, [splice.IGNORE] * len(tokens)), image, int(plan["m"][i]),
            int(plan["max_new_tokens"][i]), float(plan["temperature"][i]),
            float(plan["top_p"][i]), int(plan["seed"][i]),
            stop_ids=frozenset(plan[f"stop_ids{i}"].tolist()))))
    return plan["freed"].tolist(), admitted
