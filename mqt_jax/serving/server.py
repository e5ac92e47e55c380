"""An OpenAI-compatible server over the engine (`mqt-jax serve`), where each request picks
its m: `POST /v1/chat/completions` (stream or not; MQT's `m` as an extra top-level field,
`extra_body={"m": 16}` in the official client, or "auto": the run's router picks it),
`GET /v1/models`, `/health`, `/metrics`.

FastAPI + uvicorn + pydantic + prometheus_client. Requests are checked, and their image
decoded, in a worker thread; tokens come back from the engine's thread through each
request's asyncio queue. Bad input is a 4xx naming what is wrong; a full queue 429; a server
shutting down 503. Nothing is fetched: image URLs are `data:` URLs, or paths inside
--image_root.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
import uuid
from pathlib import Path
from typing import Literal, Union

import jax
import prometheus_client as prom
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from mqt_jax.config import ServeConfig
from mqt_jax.core import splice
from mqt_jax.data.conversation import IMAGE_PLACEHOLDER, encode_chat
from mqt_jax.data.preprocess import MAX_PIXELS, BadImage, confined, open_image
from mqt_jax.inference.engine import Engine, QueueFull, Request, Stopped
from mqt_jax.inference.generate import cut_at_stop, stop_tokens
from mqt_jax.inference.policy import Router, embedding_table, router_features

Number = Union[StrictInt, StrictFloat]
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


# ---- the request schema (OpenAI's, plus m) ----
class ImageURL(BaseModel):
    url: StrictStr
    detail: StrictStr | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[ContentPart]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields (user, logprobs, ...) are not used

    model: StrictStr
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    n: StrictInt = 1
    m: StrictInt | None = None  # MQT: visual tokens for this request (default: the server's)
    _auto_m: bool = PrivateAttr(False)  # "m": "auto" (the router picks m)

    @model_validator(mode="wrap")
    @classmethod
    def _m_auto(cls, data, handler):
        auto = isinstance(data, dict) and data.get("m") == "auto"
        body = handler({**data, "m": None} if auto else data)
        body._auto_m = auto
        return body

    @property
    def auto_m(self) -> bool:
        return self._auto_m


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error(status: int, message: str, param: str | None = None, kind: str | None = None):
    kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable"}
    return JSONResponse({"error": {"message": message, "type": kind or kinds.get(status, "error"),
                                   "param": param, "code": None}}, status_code=status)


class AutoM:
    """`"m": "auto"`: the run's router (router.json, from `mqt-jax eval --m auto`) picks a
    request's m from its question and its image's first visual tokens. The image's tokens
    come through the engine's vision cache, so its prefill finds them there: one vision pass."""

    def __init__(self, model, engine: Engine):
        self.engine, self.router, self.why_not = engine, None, None
        path = Path(model.run.path) / "router.json" if getattr(model, "run", None) else None
        if path is None or not path.exists():
            self.why_not = (f"this run has no router ({path}): train one with `mqt-jax eval "
                            f"--workdir {model.run.path if path else 'RUN'} --m auto`")
        elif not engine.nested or not model.config.has_m:
            self.why_not = f"the {model.config.query.variant} model's tokens are not nested"
        elif jax.process_count() > 1:
            self.why_not = "not in a multi-process server (the router's vision pass is one process's)"
        else:
            self.router = Router.load(path).check(model.config)
            self.embedding = embedding_table(model.params)

    def __call__(self, prompt: splice.Example, image) -> int:
        if image is None:  # no visual tokens to pay for: any m answers alike
            return self.router.ladder[0]
        visual = self.engine.image_tokens(image)[None]
        features = router_features(self.embedding, visual, [prompt], self.router.ladder[0])
        return int(self.router.route(features)[0])


# ---- from a request to an engine request ----
def read_image(url: str, config: ServeConfig):
    """A decoded PIL image from a `data:` URL or a path inside --image_root; BadRequest
    naming the problem otherwise."""
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest("an image data: URL must be base64: data:image/png;base64,...", "image_url")
        if len(data) > config.max_image_bytes * 4 // 3 + 4:
            raise BadRequest(f"the image is over the {config.max_image_bytes} byte limit", "image_url")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the image data: URL holds invalid base64", "image_url") from None
        source = raw
    elif URL_SCHEME.match(url) and not url.startswith("file:"):
        raise BadRequest(f"image URL scheme {url.split(':', 1)[0]!r}: the server fetches "
                         f"nothing; send the image as a data: URL (data:image/png;base64,...)",
                         "image_url")
    else:
        if not config.image_root:
            raise BadRequest("local image paths are not served: the server was started without "
                             "--image_root; send a data: URL", "image_url")
        relative = url.removeprefix("file://").removeprefix("file:")
        try:
            path = Path(str(confined(config.image_root, relative)))
        except ValueError as e:
            raise BadRequest(str(e).split(": ", 1)[-1], "image_url") from None
        if not path.is_file():
            raise BadRequest(f"image {relative!r} not found under --image_root", "image_url")
        if path.stat().st_size > config.max_image_bytes:
            raise BadRequest(f"the image is over the {config.max_image_bytes} byte limit", "image_url")
        source = path
    try:
        return open_image(source, MAX_PIXELS, name="the image")
    except BadImage as e:
        raise BadRequest(str(e), "image_url") from None


def conversation(body: ChatRequest, config: ServeConfig):
    """(turns for encode_chat, the one image or None)."""
    turns, images = [], []
    for i, message in enumerate(body.messages):
        if message.role == "system":
            raise BadRequest("system messages are not supported: the model's template has its "
                             "own system prompt", f"messages[{i}]")
        parts = ([ContentPart(type="text", text=message.content)]
                 if isinstance(message.content, str) else message.content)
        texts = []
        for j, part in enumerate(parts):
            if part.type == "text":
                if part.text is None:
                    raise BadRequest("a text part needs 'text'", f"messages[{i}].content[{j}]")
                if IMAGE_PLACEHOLDER in part.text:
                    raise BadRequest(f"{IMAGE_PLACEHOLDER} in a message: send the image as an "
                                     f"image_url part", f"messages[{i}].content[{j}]")
                texts.append(part.text)
            else:
                if part.image_url is None:
                    raise BadRequest("an image_url part needs 'image_url'",
                                     f"messages[{i}].content[{j}]")
                if message.role != "user":
                    raise BadRequest("images go in user messages", f"messages[{i}]")
                images.append(part.image_url.url)
                texts.insert(0, IMAGE_PLACEHOLDER)
        turns.append({"from": "human" if message.role == "user" else "gpt",
                      "value": "\n".join(texts)})
    if len(images) > 1:
        raise BadRequest(f"{len(images)} images: the model's template takes one", "messages")
    return turns, images[0] if images else None


def prepare(body: ChatRequest, model, engine: Engine, config: ServeConfig,
            auto_m: AutoM | None = None) -> Request:
    """An engine request, every field checked (runs in a worker thread: decodes the image;
    with "m": "auto", the router's vision pass too)."""
    if body.model != config.model_name:
        raise BadRequest(f"model {body.model!r} is not served here; this server serves "
                         f"{config.model_name!r}", "model", status=404)
    if body.n != 1:
        raise BadRequest(f"n={body.n}: one choice per request", "n")
    if not body.messages:
        raise BadRequest("messages is empty", "messages")
    if body.auto_m and (auto_m is None or auto_m.router is None):  # before the image is decoded
        raise BadRequest(f"m='auto': {auto_m.why_not if auto_m else 'not served here'}", "m")
    m = config.default_m if body.m is None else body.m
    big_m = model.config.num_queries
    if not 1 <= m <= big_m:
        raise BadRequest(f"m={m} outside [1, {big_m}] (M, the model's visual tokens)", "m")
    if not model.config.has_m and m != big_m:
        raise BadRequest(f"m={m}: this {model.config.query.variant} model has no m; it always "
                         f"uses {big_m} tokens", "m")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not 0 <= temperature < float("inf"):  # NaN too (JSON parsers accept it)
        raise BadRequest(f"temperature={temperature} must be a number >= 0", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p={top_p} must be in (0, 1]", "top_p")
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"max_tokens={max_tokens} must be >= 1", "max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    turns, url = conversation(body, config)
    image = model.image(read_image(url, config)) if url else None
    try:
        prompt = encode_chat(turns, model.template, model.tokenizer, has_image=url is not None)
    except ValueError as e:  # BadRecord: a turn without text, ...
        raise BadRequest(str(e).split(": ", 1)[-1], "messages") from None
    if body.auto_m:
        m = auto_m(prompt, image)
    if max_tokens is None:  # OpenAI's default: up to the room left (here capped)
        room = engine.cache_len - splice.true_length(prompt, [m])
        max_tokens = max(1, min(config.default_max_tokens, room))
    stop_ids = stop_tokens(model.tokenizer, stop, model.config.llm.vocab_size).nonzero()[0]
    seed = (body.seed if body.seed is not None else uuid.uuid4().int) % 2**32
    request = Request(prompt, image, m, max_tokens, temperature, top_p, seed,
                      frozenset(stop_ids.tolist()), stop)
    try:
        engine.check(request)
    except ValueError as e:
        raise BadRequest(str(e), "max_tokens" if "max_tokens" in str(e) else None) from None
    return request


class Detokenizer:
    """Text deltas from a growing list of token ids: the text is decoded whole each time
    (sentencepiece merges pieces and bytes), a trailing incomplete character and a suffix
    that may begin a stop string are held back, and the text ends before a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids, self.sent, self.text = tokenizer, stop, [], 0, ""

    def add(self, token: int) -> tuple[str, bool]:
        """(the new text to send, whether a stop string has appeared)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids).lstrip()
        self.text = cut_at_stop(full, self.stop)
        stopped = len(self.text) < len(full)
        safe = len(self.text) if stopped else len(self.text) - self._held(self.text)
        delta = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return delta, stopped

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            held = max([held] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
        return held

    def rest(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


# ---- metrics ----
class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("mqt_requests", "Chat requests admitted, by m", ["m"], registry=r)
        self.refused = prom.Counter("mqt_refused_requests", "Requests refused, by HTTP status",
                                    ["status"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = prom.Histogram("mqt_time_to_first_token_seconds", "Submission to first "
                                   "token", registry=r, buckets=buckets)
        self.latency = prom.Histogram("mqt_request_latency_seconds", "Submission to last token",
                                      registry=r, buckets=buckets)
        prom.Gauge("mqt_queue_length", "Requests waiting for a slot",
                   registry=r).set_function(lambda: engine.queue_length)
        prom.Gauge("mqt_live_slots", "Decode slots in use",
                   registry=r).set_function(lambda: engine.live_slots)
        r.register(EngineCounters(engine))

    def finished(self, request: Request) -> None:
        if request.first_token_at:
            self.ttft.observe(request.first_token_at - request.submitted)
        self.latency.observe(request.done_at - request.submitted)


class EngineCounters:
    """The engine's own counts as Prometheus counters (rate() of tokens gives tokens/s)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e, c = self.engine, self.engine.vision_cache
        for name, doc, value in (
                ("mqt_generated_tokens", "Tokens generated", e.stats["tokens"]),
                ("mqt_vision_cache_hits", "Images whose visual tokens came from the cache", c.hits),
                ("mqt_vision_cache_misses", "Images that needed a vision pass", c.misses),
                ("mqt_prefills", "Prefill calls (groups of prompts)", e.stats["prefills"]),
                ("mqt_decode_steps", "Decode steps (one token for every slot)", e.stats["decode_steps"])):
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily("mqt_finished_requests", "Requests ended, by finish reason "
                                       "(stop, length, cancelled: the client left, error)",
                                       labels=["reason"])
        for reason in ("stop", "length", "cancelled", "error"):
            finished.add_metric([reason], e.stats["finished_" + reason])
        yield finished


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) by its
    Content-Length before any of it is read, or, sent without one, once it passes the limit
    (the app is then handed an ended body and its reply replaced)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.refuse(scope, receive, send)
        seen, over, refused = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def answer(message):
            nonlocal refused
            if not over:
                return await send(message)
            if not refused:
                refused = True
                await self.refuse(scope, receive, send)

        await self.app(scope, counted, answer)

    async def refuse(self, scope, receive, send):
        await error(413, f"the request body is over the {self.limit} byte limit (--max_image_mb "
                         f"sets it)")(scope, receive, send)


# ---- the app ----
def make_app(model, engine: Engine, config: ServeConfig) -> FastAPI:
    metrics = Metrics(engine)
    auto_m = AutoM(model, engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)  # finish what is queued and running

    app = FastAPI(title="mqt_jax", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # the deepest error names the field (a union's other branches fail at its top)
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        where = ".".join(str(p) for p in first.get("loc", ())
                         if p != "body" and not (isinstance(p, str) and ("[" in p or p == "str")))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            message, where = (f"the body must be JSON sent as Content-Type: application/json, "
                              f"not {kind or 'no content type'!r}"), None
        elif first.get("type") == "json_invalid":
            message, where = f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            message = f"{where or 'body'}: {first['msg']}"
        metrics.refused.labels(status="400").inc()
        return error(400, message, where or None)

    @app.get("/health")
    async def health():
        if not engine.admitting:
            return error(503, "shutting down")
        return {"status": "ok", "live_slots": engine.live_slots, "queue_length": engine.queue_length}

    @app.get("/v1/models")
    async def models():
        cfg = model.config
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "mqt_jax", "default_m": config.default_m, "max_m": cfg.num_queries,
            "variant": cfg.query.variant, "max_tokens_per_request": engine.cache_len,
            "m_auto": auto_m.router is not None}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        try:
            request = await run_in_threadpool(prepare, body, model, engine, config, auto_m)
        except BadRequest as e:
            metrics.refused.labels(status=str(e.status)).inc()
            return error(e.status, e.message, e.param)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request.emit = lambda token, finish: loop.call_soon_threadsafe(queue.put_nowait, (token, finish))
        try:
            engine.submit(request)
        except QueueFull as e:
            metrics.refused.labels(status="429").inc()
            return error(429, str(e))
        except Stopped as e:
            metrics.refused.labels(status="503").inc()
            return error(503, str(e))
        metrics.requests.labels(m=str(request.m)).inc()
        completion = Completion(request, model, config, metrics, engine, queue)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return EventStream(completion, usage)
        return await completion.whole()

    return app


class EventStream(StreamingResponse):
    """A completion's Server-Sent Events, which free the request's slot however they end. A
    client that leaves while a chunk is being sent cancels the response there, leaving the
    event generator suspended: its own `finally` would wait for the garbage collector, and the
    slot would decode on for nobody until max_tokens."""

    def __init__(self, completion: Completion, include_usage: bool):
        super().__init__(completion.events(include_usage), media_type="text/event-stream")
        self.completion = completion

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.completion.leave()


class Completion:
    """One admitted request's answer, whole or as Server-Sent Events."""

    def __init__(self, request: Request, model, config: ServeConfig, metrics: Metrics,
                 engine: Engine, queue: asyncio.Queue):
        self.request, self.model, self.config, self.metrics = request, model, config, metrics
        self.engine, self.queue = engine, queue
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.text = Detokenizer(model.tokenizer, request.stop)
        self.left = False

    async def tokens(self):
        """(text delta, None) per token, then ("", finish reason)."""
        try:
            while True:
                token, finish = await self.queue.get()
                if token is None:
                    break
                delta, stopped = self.text.add(token)
                if stopped:  # a stop string spread over tokens: the engine cannot see it
                    self.engine.cancel(self.request)
                    yield delta, None
                    finish = "stop"
                    break
                if delta:
                    yield delta, None
            rest = self.text.rest()
            if rest:
                yield rest, None
            yield "", finish
        finally:
            self.leave()

    def leave(self):
        """Free the slot if the answer is unfinished (the client went away), else count it;
        once, however often the ways a response ends call it."""
        if self.left:
            return
        self.left = True
        if self.request.finish is None:
            self.engine.cancel(self.request)
        else:
            self.metrics.finished(self.request)

    def usage(self) -> dict:
        r, cfg = self.request, self.model.config
        visual = cfg.visual_tokens(r.m) if r.has_image else 0
        return {"prompt_tokens": r.prompt_len, "completion_tokens": len(r.tokens),
                "total_tokens": r.prompt_len + len(r.tokens), "visual_tokens": visual, "m": r.m}

    async def whole(self):
        text, finish = [], None
        async for delta, finish in self.tokens():
            text.append(delta)
        if finish == "error":
            return error(500, "the engine failed (see the server's log); it serves no more")
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.config.model_name,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": "".join(text).strip()}}],
                "usage": self.usage()}

    def _chunk(self, delta: dict, finish=None, usage=None) -> str:
        import json

        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.config.model_name,
                 "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, include_usage: bool):
        yield self._chunk({"role": "assistant", "content": ""})
        async for delta, finish in self.tokens():
            yield self._chunk({"content": delta} if delta else {}, finish)
        if include_usage:
            yield self._chunk({}, usage=self.usage())
        yield "data: [DONE]\n\n"


def listen(host: str, port: int):
    """A socket bound to host:port (port 0: any free one), or an OSError saying why not;
    bound before the model loads, so a taken port fails at once."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(model, engine: Engine, config: ServeConfig, sock) -> int:
    """Serve on the bound socket `sock` (see `listen`) until SIGTERM or Ctrl-C; then finish
    the admitted requests and return 0."""
    import faulthandler
    import signal

    import uvicorn

    app = make_app(model, engine, config)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn re-raises a captured signal once shut down, so the process would die by
            # SIGTERM after finishing its requests; a clean drain exits 0 instead.
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != sig]

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    # Listen before saying so: a client that connects on "serving" then waits in the backlog
    # until uvicorn accepts, instead of being refused while uvicorn starts up.
    sock.listen(server.config.backlog)
    print(f"serving {config.model_name} (M={model.config.num_queries}, default m="
          f"{config.default_m}, {engine.config.slots} slots) on http://{host}:{port}/v1",
          flush=True)
    server.run(sockets=[sock])
    return 0
