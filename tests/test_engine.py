"""The continuous-batching engine: every request's answer equals the offline one at its m,
whatever its batch mates; bounded compilations; the vision cache; cancelling; policies."""

import dataclasses

import numpy as np
import pytest
from helpers import write_run

import mqt_jax
from mqt_jax.config import EngineConfig
from mqt_jax.core.splice import true_length
from mqt_jax.inference.engine import Engine, QueueFull, Request, Stopped
from mqt_jax.training.trainer import CompileCounter

QUESTIONS = ["What shape is in the picture?", "How many triangles are there?",
             "Describe the image in one word.", "What colour?",
             "Yes, no, left, right, top, bottom. What shape is in the picture? Describe the "
             "image in one word, then say how many triangles there are.", "Hi"]
CONFIG = EngineConfig(slots=8, cache_len=320, prefill_batch=8, bucket=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine") / "run"
    write_run(folder)
    return mqt_jax.load(folder)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (40, 30 + i, 3), dtype=np.uint8) for i in range(n)]


def request(model, i, m, max_new_tokens=8, image=None, **kw):
    image = images(len(QUESTIONS))[i % len(QUESTIONS)] if image is None else image
    return Request(model.prompt(QUESTIONS[i % len(QUESTIONS)]), model.image(image), m,
                   max_new_tokens, **kw)


def offline(model, i, m, max_new_tokens=8):
    return offline_rows(model, [(i, m)], max_new_tokens)[0]


def offline_rows(model, rows, max_new_tokens=8):
    """The offline token ids of (i, m) rows, from one batched call (m per row; that a mixed
    batch equals each row alone is tests/test_api.py's)."""
    pictures = images(len(QUESTIONS))
    answers = model.generate([pictures[i % len(QUESTIONS)] for i, _ in rows],
                             [QUESTIONS[i % len(QUESTIONS)] for i, _ in rows],
                             m=[m for _, m in rows], max_new_tokens=max_new_tokens, details=True)
    return [a.tokens for a in answers]


def test_every_answer_equals_the_offline_one_at_its_m_with_bounded_compiles(model):
    # 20 requests over 8 slots: mixed m, prompt lengths and answer lengths, so rows leave and
    # enter between decode steps, and prefills group different m.
    ms = [1, 4, 16, 2, 8, 16, 3, 1, 12, 4]
    lengths = [8, 3, 6, 8, 5, 2, 7, 4, 8, 6]
    # greedy: an answer cut at n tokens is the n-token answer
    wanted = sorted({(i % len(QUESTIONS), ms[i % 10]) for i in range(20)})
    full = dict(zip(wanted, offline_rows(model, wanted, max(lengths))))
    references = {(i, ms[i % 10], lengths[i % 10]): full[(i % len(QUESTIONS), ms[i % 10])][:lengths[i % 10]]
                  for i in range(20)}
    engine = Engine(model, CONFIG)
    requests = [request(model, i, ms[i % 10], lengths[i % 10]) for i in range(20)]
    with CompileCounter() as compiles:
        engine.run(requests)
    for i, r in enumerate(requests):
        assert r.tokens == references[(i, ms[i % 10], lengths[i % 10])], (i, r.m)
        assert r.finish in ("length", "stop")
    assert len({tuple(r.tokens) for r in requests}) > 5
    buckets = {engine._bucket(r.prompt_len) for r in requests}
    counts = {name.split("(")[-1].rstrip(")"): n for name, n in compiles.counts.items()}
    assert counts["_prefill"] == counts["_insert"] == len(buckets) and len(buckets) >= 2, counts
    assert counts["_decode"] == 1 and counts["vision_pass"] == 1, counts
    assert engine.stats["decode_steps"] < sum(len(r.tokens) for r in requests)  # shared steps


def test_arrivals_prefill_in_groups_of_their_size(model):
    """On a mesh of 4 batch devices (fsdp 4 x tensor 2) with prefill_batch 8, a lone arrival
    prefills as 4 rows (not padded to 8), five together as 8; answers equal the offline ones."""
    narrow = mqt_jax.load(model.run.path, gin_params=["MeshConfig.fsdp = 4", "MeshConfig.tensor = 2"])
    engine = Engine(narrow, CONFIG)
    assert [engine._group_rows(n) for n in range(1, 9)] == [4, 4, 4, 4, 8, 8, 8, 8]
    bucket = lambda m: engine._bucket(true_length(narrow.prompt(QUESTIONS[1]), [m]))  # noqa: E731
    ms = [m for m in range(1, 17) if bucket(m) == bucket(1)]  # five m in one length bucket
    ms = ms[::len(ms) // 5][:5]
    assert len(set(ms)) == 5
    pictures = images(6)
    with CompileCounter() as compiles:
        first = engine.submit(request(narrow, 0, 4))
        engine.step()
        assert engine.stats["prefill_rows"] == 4
        rest = [engine.submit(request(narrow, 1, m, image=pictures[k + 1])) for k, m in enumerate(ms)]
        engine.run()
    assert first.tokens == offline(narrow, 0, 4)
    want = narrow.generate(pictures[1:6], [QUESTIONS[1]] * 5, m=ms, max_new_tokens=8, details=True)
    assert [r.tokens for r in rest] == [a.tokens for a in want]
    assert (engine.stats["prefills"], engine.stats["prefill_rows"], engine.stats["vision_passes"]) == (2, 12, 2)
    counts = {name.split("(")[-1].rstrip(")"): n for name, n in compiles.counts.items()}
    assert counts == {"vision_pass": 2, "_prefill": 2, "_insert": 2, "_decode": 1}, counts


def test_the_same_image_at_another_m_needs_no_vision_pass(model):
    engine = Engine(model, CONFIG)
    engine.run([request(model, 0, 4)])
    passes = engine.stats["vision_passes"]
    second = engine.run([request(model, 0, 16)])[0]
    assert engine.stats["vision_passes"] == passes and engine.vision_cache.hits == 1
    assert second.tokens == offline(model, 0, 16)  # served from the cache, same answer
    engine.run([request(model, 1, 16)])  # another image: a pass
    assert engine.stats["vision_passes"] == passes + 1
    off = Engine(model, dataclasses.replace(CONFIG, vision_cache_mb=0))
    off.run([request(model, 0, 4), request(model, 0, 16)])
    assert off.vision_cache.hits == 0 and off.stats["vision_passes"] == 2  # a pass per m


def test_a_qformer_with_prefix_masks_keys_the_cache_by_m(tmp_path):
    write_run(tmp_path / "qformer", variant="qformer", query_mask="prefix")
    model = mqt_jax.load(tmp_path / "qformer")
    engine = Engine(model, CONFIG)
    a = engine.run([request(model, 0, 4)])[0]
    b = engine.run([request(model, 0, 16)])[0]
    assert engine.vision_cache.hits == 0 and engine.stats["vision_passes"] == 2
    assert [a.tokens, b.tokens] == offline_rows(model, [(0, 4), (0, 16)])


def test_sampling_depends_on_the_request_seed_not_its_batch_mates(model):
    alone = Engine(model, CONFIG).run([request(model, 0, 4, temperature=1.5, seed=7)])[0]
    crowd = [request(model, i, 8, temperature=1.0, seed=i) for i in range(5)]
    mixed = Engine(model, CONFIG).run(crowd + [request(model, 0, 4, temperature=1.5, seed=7)])
    assert mixed[-1].tokens == alone.tokens
    other = Engine(model, CONFIG).run([request(model, 0, 4, temperature=1.5, seed=8)])[0]
    assert other.tokens != alone.tokens != offline(model, 0, 4)


@pytest.mark.parametrize("policy", ["per_m", "static"])
def test_comparison_policies_give_the_same_answers(model, policy):
    ms = [1, 16, 4, 16, 1]
    engine = Engine(model, dataclasses.replace(CONFIG, policy=policy, slots=8))
    done = engine.run([request(model, i, ms[i]) for i in range(5)])
    for i, r in enumerate(done):
        assert r.tokens == offline(model, i, ms[i])


def test_cancel_frees_the_slot_and_stops_at_once(model):
    engine = Engine(model, CONFIG)
    events = []
    r = request(model, 0, 4, max_new_tokens=50, emit=lambda t, f: events.append((t, f)))
    engine.submit(r)
    engine.step()  # prefill (token 1) and a decode step (token 2)
    engine.step()  # token 3
    engine.cancel(r)
    engine.step()
    assert r.finish == "cancelled" and events[-1] == (None, "cancelled")
    assert engine.live_slots == 0 and len(r.tokens) == 3


def test_bad_requests_and_back_pressure(model):
    engine = Engine(model, dataclasses.replace(CONFIG, max_queue=2))
    with pytest.raises(ValueError, match=r"m=\[17\] outside"):
        engine.submit(request(model, 0, 17))
    with pytest.raises(ValueError, match="needs .* of the 320 the cache holds"):
        engine.submit(request(model, 0, 16, max_new_tokens=200))
    with pytest.raises(ValueError, match="needs its image"):
        engine.submit(dataclasses.replace(request(model, 0, 4), image=None))
    engine.submit(request(model, 0, 4))
    engine.submit(request(model, 1, 4))
    with pytest.raises(QueueFull):
        engine.submit(request(model, 2, 4))
    engine.stop()
    with pytest.raises(Stopped):
        engine.submit(request(model, 2, 4))
    with pytest.raises(ValueError, match="slots=3 is not a multiple"):
        Engine(model, dataclasses.replace(CONFIG, slots=3))
