"""The scaling-law fit on data drawn from known constants, and the paper's optimal V."""

import csv

import numpy as np
import pytest

from mqt_jax import cli
from mqt_jax.research import scaling

TRUE = {"A": 0.55, "alpha": 0.077, "beta": 0.015, "D": 0.04}  # baselines.md


def synthetic(noise=2e-4, seed=0):
    n, v = (a.ravel() for a in np.meshgrid([0.5, 1, 2, 4, 8, 16, 32, 72.0],
                                            [1, 4, 16, 36, 64, 144, 256, 576.0]))
    err = scaling.law((n, v), *TRUE.values()) + np.random.default_rng(seed).normal(0, noise, n.shape)
    return n, v, err


def test_the_fit_recovers_the_constants_within_its_confidence_intervals():
    result = scaling.fit(*synthetic())
    for name, value in TRUE.items():
        low, high = result.ci95[name]
        assert low <= value <= high, (name, value, result.ci95[name])
        assert high - low < 0.35 * value  # and the intervals are informative (D: the widest)
    assert result.values["alpha"] == pytest.approx(0.077, rel=0.03)
    assert result.values["beta"] == pytest.approx(0.015, rel=0.03)
    assert result.residual_std == pytest.approx(2e-4, rel=0.3)


def test_inference_optimal_tokens_are_the_papers():
    """Text cached (Q = 0): one visual token is compute-optimal; Q = 50: about 12 (by hand:
    d err / dV = 0 at V = beta Q / (alpha - beta) = 0.75 / 0.062 = 12.1), at every budget."""
    law = scaling.Fit(TRUE, {}, 0.0, 0)
    for budget in (1e12, 1e14):
        assert scaling.optimal_tokens(law, budget, 0)["tokens"] == 1
        best = scaling.optimal_tokens(law, budget, 50)
        assert best["tokens"] == 12
        assert best["llm_billions"] == pytest.approx(budget / (2 * 62) / 1e9)


def test_too_few_points_or_sizes_is_a_clear_error():
    with pytest.raises(ValueError, match="at least two LLM sizes"):
        scaling.fit([1.0] * 6, [1, 2, 4, 8, 16, 32], [0.5] * 6)
    with pytest.raises(ValueError, match="4 points cannot fit"):
        scaling.fit([1, 2, 1, 2], [1, 1, 4, 4], [0.5, 0.4, 0.45, 0.35])


def test_scaling_fit_command_on_a_results_table(tmp_path, capsys):
    n, v, err = synthetic()
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "llm_params", "tokens", "score"])
        writer.writerows(["mqt", int(a * 1e9), int(b), 100 * (1 - e)] for a, b, e in zip(n, v, err))
    assert cli.main(["scaling-fit", str(path), "--budget_tflops", "10", "--text_tokens", "50"]) == 0
    out = capsys.readouterr().out
    assert "alpha = 0.07" in out and "V* = 12 " in out and "warning" not in out
    assert (tmp_path / "scaling_fit.png").stat().st_size > 10_000
    bad = tmp_path / "bad.csv"
    bad.write_text("tokens,score\n1,50\n")
    assert cli.main(["scaling-fit", str(bad)]) == 2
    assert "no column(s) ['llm_params']" in capsys.readouterr().err


def test_a_fit_the_points_do_not_determine_is_flagged():
    """Error that falls with V but not with N (noise around it): alpha's interval spans 0, and
    the report says the optimal V is unsupported."""
    n = np.repeat([0.5e-3, 1.3e-3, 3e-3], 4)
    v = np.tile([1.0, 4.0, 16.0, 64.0], 3)
    err = 0.5 * v**-0.05 + np.random.default_rng(0).normal(0, 0.01, n.size)
    result = scaling.fit(n, v, err)
    assert result.ci95["alpha"][0] < 0 < result.ci95["alpha"][1]
    text = scaling.report(result, [scaling.optimal_tokens(result, 1e9, 50)])
    assert "warning: 95% CI not above 0 for alpha" in text
    assert "warning" not in scaling.report(scaling.fit(*synthetic()), [])
