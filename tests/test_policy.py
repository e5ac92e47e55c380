"""The policies as they run when answering (mqt_jax/inference/policy.py): checked, saved and
reloaded; the router's features."""

import numpy as np
import pytest
from helpers import tiny_config

from mqt_jax.core import splice
from mqt_jax.inference.generate import Generated
from mqt_jax.inference.policy import Escalate, Router, mean_logprob, router_features

LADDER = (2, 8, 16)


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


def test_router_features_and_saving(tmp_path):
    embedding = np.arange(36.0).reshape(12, 3)
    visual = np.arange(24.0).reshape(1, 8, 3)
    prompt = splice.Example([1, 7, splice.IMAGE_TOKEN, 8, 9, 10], [splice.IGNORE] * 6)
    got = router_features(embedding, visual, [prompt], first=2)
    np.testing.assert_array_equal(got[0], [27, 28, 29, 1.5, 2.5, 3.5])  # rows 8-10; tokens 0-1
    router = Router(LADDER, np.ones((6, 3)), np.zeros(3), np.zeros(6), np.ones(6), 0.25, {"a": 1})
    router.save(tmp_path / "router.json")
    back = Router.load(tmp_path / "router.json")
    assert (back.ladder, back.slack, back.calibration) == (LADDER, 0.25, {"a": 1})
    np.testing.assert_array_equal(back.weights, router.weights)
    (tmp_path / "bad.json").write_text('{"ladder": [2, 8, 16], "weights": [[1, 2]], "bias": [0, 0],'
                                       ' "mean": [0, 0], "scale": [1, 1], "slack": 0}')
    with pytest.raises(ValueError, match="not a saved router"):
        Router.load(tmp_path / "bad.json")
    cfg = tiny_config(num_queries=16)
    with pytest.raises(ValueError, match="a router of another model"):
        router.check(cfg)  # 6 features; the tiny model's are 2 x its hidden size
    with pytest.raises(ValueError, match=r"m=\[32\] outside"):
        Router((2, 32), np.ones((2 * cfg.llm.hidden, 2)), np.zeros(2), np.zeros(2 * cfg.llm.hidden),
               np.ones(2 * cfg.llm.hidden)).check(cfg)
