"""Policies replayed on hand-made per-m answers: which rung each question stops at, what it
costs, and the threshold calibration picks."""

import numpy as np
import pytest

from helpers import tiny_config
from mqt_jax import flops, splice
from mqt_jax.generate import Generated
from mqt_jax.policy import Escalate, Sweep, calibrate, mean_logprob

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


def test_policies_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="increase"):
        Escalate((8, 2))
    with pytest.raises(ValueError, match="signal"):
        Escalate(LADDER, "vibes")
    policy = Escalate(LADDER, "margin", -0.5, {"target_accuracy": 80.0})
    policy.save(tmp_path / "policy.json")
    assert Escalate.load(tmp_path / "policy.json") == policy
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved escalation policy"):
        Escalate.load(tmp_path / "bad.json")
    assert mean_logprob(Generated([5, 6], [-1.0, -2.0], -3.0, 0.0, 2, (2,))) == -2.0
