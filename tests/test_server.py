"""`mqt-jax serve` with the official openai client, on 127.0.0.1 and a port the server picks:
plain and streamed answers, 32 concurrent requests mixing m equal to the offline answers, every
bad input refused with a message (and the server serving on), a client that goes away, a full
queue, SIGTERM."""

import asyncio
import concurrent.futures
import contextlib
import io
import signal
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
from helpers import Server, data_url, one_device_env, png, user, write_run
from PIL import Image
from starlette.requests import ClientDisconnect

import mqt_jax
from mqt_jax.inference.engine import Request
from mqt_jax.serving.server import Completion, EventStream

QUESTIONS = ["What shape is in the picture?", "How many triangles are there?",
             "Describe the image in one word.", "What colour?", "Hi",
             "Yes, no, left, right, top, bottom. What shape is in the picture?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "run"
    write_run(folder)
    (folder.parent / "images").mkdir()
    (folder.parent / "images" / "a.png").write_bytes(png(0))
    return folder


AUTO = [(QUESTIONS[i], png(200 + i)) for i in range(6)]  # "m": "auto" requests


@pytest.fixture(scope="module")
def router(run, model):
    """A router saved with the run before the server starts: a random head (seeded) that
    sends the AUTO requests to more than one m, and the m it picks for each, computed here
    apart from the server."""
    from mqt_jax.inference.policy import Router, embedding_table, router_features

    features = router_features(embedding_table(model.params),
                               model.visual_tokens([image for _, image in AUTO]),
                               [model.prompt(q) for q, _ in AUTO], 2)
    for seed in range(50):
        w = np.random.default_rng(seed).normal(size=(features.shape[1], 3))
        head = Router((2, 8, 16), w, np.zeros(3), features.mean(0), features.std(0) + 1e-6)
        if len(set(head.route(features))) > 1:
            break
    head.save(run / "router.json")
    return head.route(features).tolist()


@pytest.fixture(scope="module")
def server(run, router):
    s = Server(run, run.parent, "--default_m", "4", "--image_root", str(run.parent / "images"),
               "--max_image_mb", "1", env=one_device_env())
    yield s
    s.close()


@pytest.fixture(scope="module")
def model(run):
    return mqt_jax.load(run)


def test_plain_and_streamed_answers_equal_the_offline_one(server, model):
    image = png(1)
    offline = model.generate(image, QUESTIONS[0], m=4, max_new_tokens=8)[0]
    plain = server.ask(QUESTIONS[0], data_url(image), max_tokens=8)  # m: the server's default 4
    assert plain.choices[0].message.content == offline
    assert plain.usage.model_extra == {"visual_tokens": 4, "m": 4}
    assert plain.usage.completion_tokens == 8 and plain.choices[0].finish_reason == "length"
    chunks = list(server.ask(QUESTIONS[0], data_url(image), max_tokens=8, stream=True,
                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == offline
    assert chunks[-1].usage.model_extra["m"] == 4 and chunks[-2].choices[0].finish_reason == "length"
    at16 = server.ask(QUESTIONS[0], data_url(image), max_tokens=8, extra_body={"m": 16})
    assert at16.choices[0].message.content == model.generate(image, QUESTIONS[0], m=16,
                                                              max_new_tokens=8)[0]
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["default_m"] == 4
    # a local path under --image_root, and a text-only question
    local = server.ask(QUESTIONS[1], "a.png", max_tokens=6)
    assert local.choices[0].message.content == model.generate(png(0), QUESTIONS[1], m=4,
                                                               max_new_tokens=6)[0]
    assert server.ask("Hi").usage.model_extra["visual_tokens"] == 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_32_concurrent_requests_mixing_m_each_equal_offline(server, model):
    jobs = [(i, [1, 4, 8, 16][i % 4], QUESTIONS[i % len(QUESTIONS)], 3 + i % 5) for i in range(32)]
    images = {i: png(100 + i % 6) for i, *_ in jobs}
    hits_before = server.metric("mqt_vision_cache_hits_total")

    def ask(job):
        i, m, question, n = job
        return server.ask(question, data_url(images[i]), max_tokens=n, extra_body={"m": m})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    wanted = {}  # one batched offline call per answer length (m per row)
    for n in sorted({job[3] for job in jobs}):
        group = [job for job in jobs if job[3] == n]
        texts = model.generate([images[i] for i, *_ in group], [q for _, _, q, _ in group],
                               m=[m for _, m, *_ in group], max_new_tokens=n)
        wanted.update({job[0]: text for job, text in zip(group, texts)})
    for (i, m, question, n), answer in zip(jobs, answers):
        assert answer.choices[0].message.content == wanted[i], (i, m)
        assert answer.usage.model_extra["m"] == m
    # 6 images at several m each: most of them come from the vision cache
    assert server.metric("mqt_vision_cache_hits_total") - hits_before >= 20
    assert server.metric('mqt_requests_total{m="16"}') >= 8


def test_m_auto_takes_the_routers_m_and_reports_it(server, model, router):
    assert server.client.models.list().data[0].model_extra["m_auto"] is True
    hits = server.metric("mqt_vision_cache_hits_total")
    for (question, image), m in zip(AUTO, router):
        got = server.ask(question, data_url(image), max_tokens=6, extra_body={"m": "auto"})
        assert got.usage.model_extra["m"] == m
        assert got.choices[0].message.content == model.generate(image, question, m=m,
                                                                max_new_tokens=6)[0]
    # the router's vision pass fills the cache that each request's prefill then reads
    assert server.metric("mqt_vision_cache_hits_total") - hits >= len(AUTO)
    assert server.ask("Hi", extra_body={"m": "auto"}).usage.model_extra["m"] == 2  # no image


def test_m_auto_without_a_router_is_refused_naming_how_to_train_one(tmp_path):
    from mqt_jax.serving.server import AutoM, BadRequest, ChatRequest, ServeConfig, prepare

    model = types.SimpleNamespace(run=types.SimpleNamespace(path=tmp_path))
    body = ChatRequest.model_validate({"model": "tiny", "messages": user("Hi"), "m": "auto"})
    assert body.auto_m and body.m is None
    with pytest.raises(BadRequest, match=r"no router .*`mqt-jax eval --workdir .* --m auto`"):
        prepare(body, model, None, ServeConfig(default_m=4, model_name="tiny"), AutoM(model, None))


BAD = [  # (what, request keyword arguments or a raw body, status, words of the message)
    ("unknown model", dict(model="other"), 404, "'other' is not served"),
    ("m = 0", dict(extra_body={"m": 0}), 400, "m=0 outside [1, 16]"),
    ("m above M", dict(extra_body={"m": 17}), 400, "m=17 outside"),
    ("negative m", dict(extra_body={"m": -3}), 400, "m=-3 outside"),
    ("m not an integer", dict(extra_body={"m": 2.5}), 400, "m: Input should be a valid integer"),
    ("m a string", dict(extra_body={"m": "4"}), 400, "m: Input should be a valid integer"),
    ("m 'Auto'", dict(extra_body={"m": "Auto"}), 400, "m: Input should be a valid integer"),
    ("max_tokens 0", dict(max_tokens=0), 400, "max_tokens=0 must be >= 1"),
    ("too long", dict(max_tokens=5000), 400, "of the 384 the cache holds"),
    ("temperature < 0", dict(temperature=-0.5), 400, "temperature=-0.5 must be a number >= 0"),
    ("top_p 0", dict(top_p=0), 400, "top_p=0.0 must be in (0, 1]"),
    ("top_p above 1", dict(top_p=1.5), 400, "top_p=1.5 must be in (0, 1]"),
    ("invalid base64", dict(url="data:image/png;base64,@@@not-base64"), 400, "invalid base64"),
    ("not base64 at all", dict(url="data:image/png,rawbytes"), 400, "must be base64"),
    ("undecodable bytes", dict(url=data_url(b"this is not an image")), 400, "the image"),
    ("over the byte limit", dict(url=data_url(b"\0" * (2 << 20))), 400, "byte limit"),
    ("http URL", dict(url="http://example.com/cat.png"), 400, "fetches nothing"),
    ("path outside the root", dict(url="../run/config.gin"), 400, "not a path inside"),
    ("absolute path", dict(url="/etc/passwd"), 400, "not a path inside"),
    ("missing file", dict(url="nothing.png"), 400, "not found under --image_root"),
    ("two images", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}},
        {"type": "image_url", "image_url": {"url": "a.png"}}]}]), 400, "2 images"),
    ("system message", dict(messages=[{"role": "system", "content": "be brief"}] + user("hi")),
     400, "system messages are not supported"),
    ("empty text", dict(messages=[{"role": "user", "content": "  "}]), 400, "has no text"),
    ("ends with the assistant", dict(messages=user("hi") + [{"role": "assistant", "content": "x"}]),
     400, "end with a human"),
    ("bad role", dict(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
]


@pytest.mark.parametrize("what,kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name_and_the_server_serves_on(server, what, kw, status, words):
    kw = dict(kw)
    url = kw.pop("url", None)
    messages = kw.pop("messages", user("What colour?", url))
    args = dict(model="tiny", messages=messages, max_tokens=4, temperature=0)
    with pytest.raises(openai.APIStatusError) as raised:
        server.client.chat.completions.create(**{**args, **kw})
    assert raised.value.status_code == status
    assert words in raised.value.body["message"], raised.value.body
    assert server.ask().choices[0].message.content is not None  # still serving


NAN = (b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": '
       b'NaN}')  # Python's JSON parsers accept NaN; the openai client never sends it


@pytest.mark.parametrize("body,words", [(b"{not json", "malformed JSON"),
                                        (b'{"model": "tiny"}', "messages: Field required"),
                                        (b"[1, 2]", "body"),
                                        (NAN, "temperature=nan must be a number >= 0")])
def test_malformed_bodies(server, body, words):
    reply = httpx.post(server.url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and words in reply.json()["error"]["message"]


def test_a_json_body_sent_as_text_is_named(server):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}'
    reply = httpx.post(server.url + "/v1/chat/completions", content=body,
                       headers={"content-type": "text/plain"})
    assert reply.status_code == 400
    assert "must be JSON sent as Content-Type: application/json, not 'text/plain'" in \
        reply.json()["error"]["message"]


def test_an_unknown_content_part_names_its_type(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    assert raised.value.body["message"].startswith("messages.0.content.0.type: Input should be 'text'")


@pytest.mark.parametrize("sized", [True, False])
def test_a_body_over_the_limit_is_refused_before_it_is_read(server, sized):
    """--max_image_mb 1: the body may hold 1 MiB as base64 twice and 1 MiB more (3.67 MiB)."""
    big = b'{"model": "tiny", "messages": "' + b"x" * (4 << 20) + b'"}'
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length
    reply = httpx.post(server.url + "/v1/chat/completions", content=big if sized else chunks,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "byte limit" in reply.json()["error"]["message"]
    assert server.ask().choices[0].message.content is not None  # still serving


def test_a_pixel_bomb_is_refused_before_decoding(server):
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 M pixels in a small file
    with pytest.raises(openai.BadRequestError, match="pixels"):
        server.ask(url=data_url(buf.getvalue()))


def test_a_client_that_goes_away_frees_its_slot(server):
    """The request is cancelled, not decoded on to max_tokens for nobody. The wait is long
    because a loaded 2-core CI machine can be slow; the finish reason, not the time, says
    whether the cancel worked (and a failure prints every server thread's stack)."""
    cancelled = 'mqt_finished_requests_total{reason="cancelled"}'
    before = server.metric(cancelled)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": user("Hi"), "max_tokens": 150, "stream": True}) as reply:
        lines = reply.iter_lines()
        next(lines), next(lines)  # the stream has started; then the client leaves
    deadline = time.time() + 300
    while server.metric("mqt_live_slots") > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("mqt_live_slots") == 0, server.log_tail()
    assert server.metric(cancelled) == before + 1, server.log_tail()
    assert server.ask().choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_client_that_leaves_while_a_chunk_is_sent_frees_its_slot(spec):
    """The disconnect then ends the response inside `send`, not inside the event generator
    (which the test above mostly sees): the request must be cancelled all the same. ASGI 2.3
    servers report the disconnect on `receive`; 2.4 ones raise OSError from `send`."""
    cancelled = []
    request = Request(prompt=None, image=None, m=4, max_new_tokens=8)
    engine = types.SimpleNamespace(cancel=cancelled.append)
    completion = Completion(request, types.SimpleNamespace(tokenizer=None),
                            types.SimpleNamespace(model_name="tiny"), None, engine,
                            asyncio.Queue())

    async def leave_mid_send():
        sending = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                sending.set()
                if spec == "2.4":
                    raise OSError("the client went away")
                await asyncio.Event().wait()  # the network stalls until the disconnect

        async def receive():
            await sending.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": spec}}
        with contextlib.suppress(ClientDisconnect):
            await EventStream(completion, include_usage=False)(scope, receive, send)

    asyncio.run(asyncio.wait_for(leave_mid_send(), 10))
    assert cancelled == [request]


def test_full_queue_429_then_sigterm_finishes_running_requests_and_exits_0(run, tmp_path):
    s = Server(run, tmp_path, "--default_m", "2", "--slots", "8", "--max_queue", "1",
               env=one_device_env())
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: _status(s), range(16)))
        assert 429 in replies and 200 in replies, replies
        chunks, done = [], threading.Event()

        def stream():
            for c in s.ask("Hi", max_tokens=60, stream=True):
                chunks.append(c)
            done.set()

        reader = threading.Thread(target=stream)
        reader.start()
        while not chunks:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=120) == 0
        reader.join(10)
        assert done.is_set() and chunks[-1].choices[0].finish_reason == "length"
        assert sum(bool(c.choices[0].delta.content) for c in chunks) > 1
        with pytest.raises(openai.APIConnectionError):
            s.ask()
    finally:
        s.close()


def _status(s) -> int:
    try:
        s.ask(max_tokens=30)
        return 200
    except openai.APIStatusError as e:
        return e.status_code


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i] (concatenated)."""

    PIECES = [" Hel", "lo", " wor", "ld", "\ufffd", "!"]

    def decode(self, ids):
        text = "".join(self.PIECES[i] for i in ids)
        return text.replace("\ufffd!", "é")  # a character completed by the next token


def test_detokenizer_holds_back_stop_prefixes_and_incomplete_characters():
    from mqt_jax.serving.server import Detokenizer

    text = Detokenizer(Pieces(), ("world",))
    assert text.add(0) == ("Hel", False)  # leading space dropped
    assert text.add(1) == ("lo", False)
    assert text.add(2) == (" ", False)  # "wor" may begin "world": held
    assert text.add(3) == ("", True)  # "world" appeared: the text ends before it
    assert text.text == "Hello " and text.rest() == ""
    text = Detokenizer(Pieces(), ())
    assert [text.add(i) for i in (0, 4, 5)] == [("Hel", False), ("", False), ("é", False)]


def test_the_socket_listens_before_serving_is_printed(monkeypatch, capsys):
    """Clients connect as soon as "serving ... on URL" appears: until uvicorn accepts (its
    start-up takes a moment, longer on a loaded machine) they must wait in the backlog, not
    be refused. Before, the socket listened only once uvicorn had started (a CI run lost a
    multi-process test to a refused connection)."""
    import faulthandler
    import socket

    import uvicorn

    from mqt_jax.serving import server as server_module

    sock = server_module.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen = {}

    def run_uvicorn(_self, sockets):  # the moment uvicorn would start: a client connects now
        seen["printed"] = "serving" in capsys.readouterr().out
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            seen["connected"] = True

    monkeypatch.setattr(server_module, "make_app", lambda *_: None)
    # what would grab pytest's captured stderr: the stack dump and uvicorn's logging setup
    monkeypatch.setattr(faulthandler, "register", lambda *_, **__: None)
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda _self: None)
    monkeypatch.setattr(uvicorn.Server, "run", run_uvicorn)
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_queries=16))
    engine = types.SimpleNamespace(config=types.SimpleNamespace(slots=2))
    config = types.SimpleNamespace(model_name="tiny", default_m=4)
    try:
        assert server_module.serve(model, engine, config, sock) == 0
    finally:
        sock.close()
    assert seen == {"printed": True, "connected": True}
