"""mqt_jax.load and Model: a run folder opened from anywhere, rows at different m in one
batch equal to each row alone, log-probabilities equal to a plain forward's."""

import jax
import numpy as np
import pytest
from helpers import write_run

import mqt_jax
from mqt_jax.core import splice
from mqt_jax.models.vlm import MODEL_INPUTS

QUESTIONS = ["What shape is in the picture?", "How many triangles are there?",
             "Describe the image in one word.", "What colour?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "run"
    write_run(folder)
    return folder


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (40, 30 + i, 3), dtype=np.uint8) for i in range(n)]


def test_a_mixed_m_batch_equals_each_row_alone(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no gin parsed first, any working directory
    model = mqt_jax.load(run)
    assert model.config.num_queries == 16 and model.template == "vicuna_v1"
    m = [1, 4, 16, 2]
    together = model.generate(images(4), QUESTIONS, m=m, max_new_tokens=8)
    alone = [model.generate(images(4)[i], QUESTIONS[i], m=m[i], max_new_tokens=8)[0]
             for i in range(4)]
    assert together == alone
    assert len(set(together)) > 1  # the rows differ: the comparison compares something
    # m matters: the same rows at M give other answers
    assert model.generate(images(4), QUESTIONS, m=16, max_new_tokens=8) != together


def test_details_give_tokens_and_their_log_probabilities(run):
    model = mqt_jax.load(run)
    answers = model.generate(images(2), QUESTIONS[:2], m=[3, 9], max_new_tokens=6, details=True)
    for answer, image, question in zip(answers, images(2), QUESTIONS):
        # Reference: one forward over prompt + answer, log-softmax in numpy.
        prompt = model.prompt(question)
        example = splice.Example(list(prompt.tokens) + answer.tokens,
                                 [splice.IGNORE] * (len(prompt.tokens) + len(answer.tokens)))
        laid = splice.layout_rows([[example]], np.array([[answer.m]]), 16, 256)
        batch = {"images": model.image(image)[None, None], "m": np.array([[answer.m]]), **laid}
        logits = np.asarray(jax.jit(model.module.apply)({"params": jax.device_get(model.params)},
                                                        *(batch[k] for k in MODEL_INPUTS)))[0]
        start = splice.true_length(prompt, [answer.m]) - 1
        rows = logits[start:start + len(answer.tokens)].astype(np.float64)
        logp = rows - rows.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        assert answer.tokens == rows.argmax(-1).tolist()  # greedy: the argmax each time
        np.testing.assert_allclose(answer.logprobs, logp[np.arange(len(answer.tokens)), answer.tokens],
                                   atol=1e-4)
    scored = model.score(images(2), QUESTIONS[:2], [a.text for a in answers], m=[3, 9])
    assert scored.shape == (2,) and np.all(scored < 0)


def test_visual_tokens_are_the_really_truncated_computation(run):
    model = mqt_jax.load(run)
    tokens = model.visual_tokens(images(2))
    assert tokens.shape == (2, 16, model.config.llm.hidden)
    pixels = np.stack([model.image(i) for i in images(2)])
    truncated = jax.jit(model.module.apply, static_argnames=("num_queries", "method"))(
        {"params": jax.device_get(model.params)}, pixels, np.full(2, 4), num_queries=4,
        method="visual_tokens")
    np.testing.assert_allclose(tokens[:, :4], truncated, rtol=1e-5, atol=1e-5)


def test_bad_calls_are_named(run, tmp_path):
    model = mqt_jax.load(run)
    with pytest.raises(ValueError, match=r"m=\[0\] outside \[1, 16\]"):
        model.generate(images(1), QUESTIONS[:1], m=0)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model.generate(images(2), QUESTIONS[:1])
    with pytest.raises(ValueError, match="m has 3 values for 2 rows"):
        model.generate(images(2), QUESTIONS[:2], m=[1, 2, 3])
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        model.generate(np.zeros((4, 4), np.uint8), QUESTIONS[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mqt_jax.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no config.gin"):
        mqt_jax.load(tmp_path)


def test_m_auto_escalates_with_the_saved_policy_and_reports_the_m_used(run):
    from mqt_jax.inference.policy import Escalate

    model = mqt_jax.load(run)
    with pytest.raises(ValueError, match="calibrate one with `mqt-jax eval"):
        model.generate(images(1), QUESTIONS[:1], m="auto")
    with pytest.raises(ValueError, match="evaluation only"):
        model.generate(images(1), QUESTIONS[:1], m="auto", policy="oracle")
    with pytest.raises(ValueError, match="'auto'"):
        model.generate(images(1), QUESTIONS[:1], m="many")
    fixed = {m: model.generate(images(4), QUESTIONS, m=m, max_new_tokens=6, details=True)
             for m in (2, 8, 16)}
    # A threshold between the rows' confidences at m = 2: some stop there, the rest climb.
    conf = sorted(np.mean(a.logprobs) for a in fixed[2])
    policy = Escalate((2, 8, 16), "mean_logprob", (conf[1] + conf[2]) / 2)
    policy.save(run / "policy.json")
    try:
        got = model.generate(images(4), QUESTIONS, m="auto", max_new_tokens=6, details=True)
    finally:
        (run / "policy.json").unlink()
    assert len({a.m for a in got}) > 1  # rows stopped at different rungs
    for a in got:
        want = fixed[a.m][got.index(a)]
        assert (a.text, a.tokens) == (want.text, want.tokens)
        np.testing.assert_allclose(a.logprobs, want.logprobs, atol=1e-5)
        assert a.tried == (2, 8, 16)[: (2, 8, 16).index(a.m) + 1]
    climbed = model.generate(images(4), QUESTIONS, m="auto", max_new_tokens=6,
                             policy=Escalate((2, 8, 16)))  # threshold inf: always to the top
    assert climbed == [a.text for a in fixed[16]]


def test_m_auto_routes_each_row_to_the_m_its_router_picks(run):
    from mqt_jax.inference.policy import Router, embedding_table, router_features

    model = mqt_jax.load(run)
    with pytest.raises(ValueError, match="router.json does not exist"):
        model.generate(images(1), QUESTIONS[:1], m="auto", policy="router")
    examples = [model.prompt(q) for q in QUESTIONS]
    features = router_features(embedding_table(model.params), model.visual_tokens(images(4)),
                               examples, 2)  # computed apart from generate's own path
    for seed in range(50):  # a random head that sends the rows to more than one rung
        w = np.random.default_rng(seed).normal(size=(features.shape[1], 3))
        router = Router((2, 8, 16), w, np.zeros(3), features.mean(0), features.std(0) + 1e-6)
        if len(set(router.route(features))) > 1:
            break
    router.save(run / "router.json")
    try:
        got = model.generate(images(4), QUESTIONS, m="auto", policy="router", max_new_tokens=6,
                             details=True)
    finally:
        (run / "router.json").unlink()
    assert [a.m for a in got] == router.route(features).tolist()
    for a in got:
        want = model.generate(images(4)[got.index(a)], QUESTIONS[got.index(a)], m=a.m,
                              max_new_tokens=6, details=True)[0]
        assert (a.text, a.tokens, a.tried) == (want.text, want.tokens, (a.m,))
