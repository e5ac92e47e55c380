"""Calibration (mqt_jax/evaluation/policies.py): policies replayed on hand-made per-m
answers, which rung each question stops at, what it costs, and the threshold calibration
picks; the router trained and its slack calibrated."""

import numpy as np
import pytest
from helpers import tiny_config

from mqt_jax.core import flops, splice
from mqt_jax.evaluation.policies import Sweep, calibrate, calibrate_router, log_loss, train_router
from mqt_jax.inference.generate import Generated
from mqt_jax.inference.policy import Escalate, Router

LADDER = (2, 8, 16)


def answer(confidence, m):
    return Generated([5], [confidence], None, 1.0, m, (m,))


@pytest.fixture
def sweep():
    cfg = tiny_config(num_queries=16)
    prompt = splice.Example([1, 7, splice.IMAGE_TOKEN, 8, 9, 10], [splice.IGNORE] * 6)
    # question:          0     1     2     3
    confidence = {2: [-0.1, -2.0, -2.0, -3.0], 8: [-0.5, -0.2, -2.0, -3.0], 16: [-0.1, -0.1, -0.1, -3.0]}
    correct = {2: [1, 0, 0, 0], 8: [1, 1, 0, 0], 16: [1, 1, 1, 0]}
    return Sweep(cfg, [prompt] * 4, {m: [answer(c, m) for c in cs] for m, cs in confidence.items()},
                 {m: np.array(c, bool) for m, c in correct.items()})


def test_escalation_stops_at_the_first_confident_rung_and_pays_for_the_climb(sweep):
    out = sweep.escalate(Escalate(LADDER, threshold=-1.0))
    assert out.m.tolist() == [2, 8, 16, 16]
    assert out.tried == [(2,), (2, 8), (2, 8, 16), (2, 8, 16)]
    assert out.correct.tolist() == [True, True, True, False]
    cfg = sweep.model_config
    want = [flops.escalation_prefill_flops(cfg, t, 2, 3) for t in out.tried]
    np.testing.assert_allclose(out.flops, want)
    assert out.summary()["accuracy"] == 75.0 and out.summary()["mean_m"] == 10.5
    always_top = sweep.escalate(Escalate(LADDER, threshold=float("inf")))
    assert always_top.m.tolist() == [16] * 4


def test_the_oracle_takes_the_smallest_right_m_at_a_fresh_answers_cost(sweep):
    out = sweep.oracle(LADDER)
    assert out.m.tolist() == [2, 8, 16, 2] and out.correct.tolist() == [True, True, True, False]
    np.testing.assert_allclose(out.flops[0], flops.inference_flops(sweep.model_config, 2, 5)["total"])


def test_calibration_picks_the_cheapest_threshold_reaching_the_target(sweep):
    top = sweep.fixed(16).summary()
    assert top["accuracy"] == 75.0
    policy = calibrate(sweep, LADDER, "mean_logprob", target_accuracy=75.0)
    # thresholds above -0.1 send question 0 up too; below -2.0 question 2 stops at 8, wrong
    assert -2.0 < policy.threshold <= -0.2 and policy.calibration["reached"]
    assert sweep.escalate(policy).summary()["accuracy"] == 75.0
    cheap = calibrate(sweep, LADDER, "mean_logprob", tflops_budget=0.0)  # nothing fits: cheapest
    assert not cheap.calibration["reached"] and sweep.escalate(cheap).m.tolist() == [2, 2, 2, 2]


def test_the_router_learns_which_questions_need_more_tokens():
    rng = np.random.default_rng(0)
    hard = rng.random(600) < 0.5
    features = np.concatenate([hard[:, None] + 0.1 * rng.normal(size=(600, 1)),
                               rng.normal(size=(600, 3))], 1)  # one telling feature, 3 noise
    right = rng.random((600, 3)) < 0.95
    correct = np.stack([right[:, 0] & ~hard, right[:, 1] & ~hard, right[:, 2]], 1)
    router = train_router(features[:400], correct[:400], LADDER)
    held = router.predict(features[400:])
    assert log_loss(held, correct[400:]) < 0.7 * log_loss(
        np.broadcast_to(correct[:400].mean(0), held.shape), correct[400:])
    chosen = Router(router.ladder, router.weights, router.bias, router.mean, router.scale,
                    slack=0.1).route(features[400:])
    # 97% of the held-out questions go where they belong (a head on the base rates alone would
    # send all of them to one rung: 50%); the misses are noise features the head leaned on
    assert (chosen == np.where(hard[400:], 16, 2)).mean() >= 0.95


def test_the_routers_slack_is_calibrated_on_validation(sweep):
    # question:   0: right everywhere; 1: from m = 8; 2: only at 16; 3: never
    p = np.array([[0.9, 0.9, 0.9], [0.2, 0.8, 0.85], [0.2, 0.3, 0.8], [0.5, 0.5, 0.5]])
    router = Router(LADDER, np.log(p / (1 - p)), np.zeros(3), np.zeros(4), np.ones(4),
                    calibration={"train_base_rates": [0.25, 0.5, 0.75]})
    features = np.eye(4)  # a question's one-hot row picks its row of logits
    np.testing.assert_allclose(router.predict(features), p)
    tuned = calibrate_router(sweep, router, features, target_accuracy=75.0)
    # slack >= 0.05 stops question 1 at 8; slack < 0.5 keeps question 2 from stopping at 8
    assert 0.05 - 1e-9 <= tuned.slack < 0.5 and tuned.calibration["reached"]
    out = sweep.route(tuned, features)
    assert out.m.tolist() == [2, 8, 16, 2] and out.summary()["accuracy"] == 75.0
    cfg = sweep.model_config
    want = [flops.inference_flops(cfg, m, 5)["total"] + router.head_flops() for m in (2, 8, 16, 2)]
    np.testing.assert_allclose(out.flops, want)
    assert tuned.calibration["val_log_loss"] < tuned.calibration["val_log_loss_base_rates"]




def saved_router(tmp_path, **change):
    import json

    fields = {"policy": "router", "ladder": [2, 8], "slack": 0.1, "weights": [[0.5, -0.5]] * 3,
              "bias": [0.0, 0.0], "mean": [0.0] * 3, "scale": [1.0] * 3, "calibration": {}}
    path = tmp_path / "router.json"
    path.write_text(json.dumps(fields | change))
    return path


@pytest.mark.parametrize("change,culprit", [
    ({"weights": [[float("nan"), 0.0]] * 3}, "the router's weights are not all finite"),
    ({"scale": [1.0, 0.0, 1.0]}, "the router's scale .* must be > 0"),
    ({"slack": float("nan")}, "slack nan: a number >= 0"),
    ({"slack": -0.5}, "slack -0.5: a number >= 0"),
    ({"calibration": [1, 2]}, "calibration \\[1, 2\\]: expected an object"),
    ({"bias": [0.0]}, "shapes disagree"),
])
def test_a_router_file_with_nonsense_is_refused_on_load(tmp_path, change, culprit):
    Router.load(saved_router(tmp_path))  # the unchanged file loads
    with pytest.raises(ValueError, match=f"router.json: not a saved router \\(.*{culprit}"):
        Router.load(saved_router(tmp_path, **change))


@pytest.mark.parametrize("threshold,calibration,culprit", [
    (float("nan"), {}, "threshold nan"), (float("-inf"), {}, "threshold -inf"),
    (0.5, "x", "calibration 'x': expected an object"),
])
def test_a_policy_file_with_nonsense_is_refused_on_load(tmp_path, threshold, calibration, culprit):
    import json

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"policy": "escalate", "ladder": [2, 8], "signal": "margin",
                                "threshold": threshold, "calibration": calibration}))
    with pytest.raises(ValueError, match=f"policy.json: not a saved escalation policy \\({culprit}"):
        Escalate.load(path)


def test_eval_names_a_saved_router_of_another_model_before_answering(tmp_path):
    from mqt_jax.config import EvalConfig
    from mqt_jax.evaluation.policies import evaluate_policies
    from mqt_jax.inference.policy import default_ladder

    cfg = tiny_config(num_queries=16)
    ladder = default_ladder(16)
    Router(ladder, np.zeros((8, len(ladder))), np.zeros(len(ladder)), np.zeros(8), np.ones(8),
           calibration={"step": 5}).save(tmp_path / "router.json")
    with pytest.raises(ValueError, match="the router reads 8 features; this model's are"):
        evaluate_policies(cfg, {}, EvalConfig(), None, tmp_path / "out", tmp_path, about={"step": 5})
