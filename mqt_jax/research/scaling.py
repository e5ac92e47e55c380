"""The visual-token scaling law of Li et al. (shared/reference/baselines.md):

    err(N, V) = A * N^-alpha * V^-beta + D

N the LLM's parameters in billions, V the visual tokens, err = 1 - accuracy. Inference
compute is about 2 N (Q + V) for Q text tokens, so at a fixed budget a larger LLM pays with
fewer visual tokens; `optimal_tokens` finds the V that minimises the fitted error there.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

NAMES = ("A", "alpha", "beta", "D")


def law(nv, a, alpha, beta, d):
    n, v = nv
    return a * n ** (-alpha) * v ** (-beta) + d


@dataclasses.dataclass(frozen=True)
class Fit:
    values: dict  # A, alpha, beta, D
    ci95: dict  # name -> (low, high): value -/+ t(0.975, dof) * standard error
    residual_std: float
    points: int

    def predict(self, n, v):
        return law((np.asarray(n, float), np.asarray(v, float)), *(self.values[k] for k in NAMES))


def fit(n_billions, tokens, err) -> Fit:
    """Least-squares fit (scipy curve_fit) with 95% confidence intervals from its covariance."""
    from scipy import optimize, stats

    n, v, e = (np.asarray(x, float) for x in (n_billions, tokens, err))
    if not (n.shape == v.shape == e.shape) or n.ndim != 1:
        raise ValueError("N, V and err must be 1-D arrays of one length")
    if len(e) <= len(NAMES):
        raise ValueError(f"{len(e)} points cannot fit {len(NAMES)} constants: run more sizes or "
                         f"token counts")
    if len(np.unique(n)) < 2 or len(np.unique(v)) < 2:
        raise ValueError("the fit needs at least two LLM sizes and two token counts")
    if (n <= 0).any() or (v <= 0).any():
        raise ValueError("N and V must be positive")
    start = (max(e.max() - e.min(), 1e-3), 0.1, 0.05, max(e.min() * 0.5, 0.0))
    values, cov = optimize.curve_fit(law, (n, v), e, p0=start, maxfev=20000,
                                     bounds=([0, -2, -2, -1], [np.inf, 5, 5, 1]))
    dof = len(e) - len(NAMES)
    stderr = np.sqrt(np.clip(np.diag(cov), 0, None))
    t = stats.t.ppf(0.975, dof)
    residual = e - law((n, v), *values)
    return Fit(dict(zip(NAMES, values.tolist())),
               {k: (x - t * s, x + t * s) for k, x, s in zip(NAMES, values, stderr)},
               float(np.sqrt((residual**2).sum() / dof)), len(e))


def optimal_tokens(result: Fit, budget_flops: float, text_tokens: int,
                   max_tokens: int = 576) -> dict:
    """At inference compute C = 2 N (Q + V) (N in parameters), the V in [1, max_tokens] whose
    N = C / (2 (Q + V)) gives the lowest fitted error."""
    v = np.arange(1, max_tokens + 1, dtype=float)
    n = budget_flops / (2 * (text_tokens + v)) / 1e9
    err = result.predict(n, v)
    best = int(np.argmin(err))
    return {"budget_flops": budget_flops, "text_tokens": text_tokens, "tokens": int(v[best]),
            "llm_billions": float(n[best]), "err": float(err[best])}


def read_results(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N in billions, V, err) from a sweep's results.csv (columns llm_params, tokens, score)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    missing = {"llm_params", "tokens", "score"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)}; expected a sweep's results.csv")
    rows = [r for r in rows if r["score"] not in ("", None)]
    n = np.array([float(r["llm_params"]) / 1e9 for r in rows])
    v = np.array([float(r["tokens"]) for r in rows])
    err = np.array([1 - float(r["score"]) / 100 for r in rows])
    return n, v, err


def report(result: Fit, optima: list[dict]) -> str:
    lines = [f"err(N, V) = A N^-alpha V^-beta + D over {result.points} points "
             f"(N in billions; residual std {result.residual_std:.4f}):"]
    lines += [f"  {k:5s} = {result.values[k]:.4g}  (95% CI {lo:.4g} .. {hi:.4g})"
              for k, (lo, hi) in result.ci95.items()]
    undetermined = [k for k in ("alpha", "beta") if result.ci95[k][0] <= 0]
    if undetermined:
        lines.append(f"  warning: 95% CI not above 0 for {', '.join(undetermined)}: these points "
                     "do not determine how the error falls, so V* below rests on nothing")
    lines += [f"  budget {o['budget_flops']:.3g} FLOPs, Q = {o['text_tokens']}: V* = {o['tokens']} "
              f"with a {o['llm_billions']:.3g}B LLM (err {o['err']:.3f})" for o in optima]
    return "\n".join(lines)


def plot(result: Fit, data, optima: list[dict], path: Path) -> None:
    """Left: the data and the fitted err(V) per LLM size. Right: at each budget, the fitted
    error along V (N = C / 2(Q + V)), the optimum marked: the Pareto front of N against V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mqt_jax.core.outputs import save_figure

    n, v, err = data
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    grid = np.geomspace(1, max(v.max(), 2), 100)
    for i, size in enumerate(np.unique(n)):
        sel = n == size
        left.plot(v[sel], err[sel], "o", color=f"C{i}")
        left.plot(grid, result.predict(size, grid), "-", color=f"C{i}", label=f"N = {size:.3g}B")
    left.set(xscale="log", xlabel="visual tokens V", ylabel="error = 1 - accuracy",
             title="fit: " + ", ".join(f"{k}={result.values[k]:.3g}" for k in NAMES))
    left.legend(fontsize=7)
    tokens = np.arange(1, 577, dtype=float)
    for i, o in enumerate(optima):
        size = o["budget_flops"] / (2 * (o["text_tokens"] + tokens)) / 1e9
        right.plot(tokens, result.predict(size, tokens), "-", color=f"C{i}",
                   label=f"{o['budget_flops']:.2g} FLOPs: V* = {o['tokens']}")
        right.plot([o["tokens"]], [o["err"]], "*", color=f"C{i}", ms=12)
    right.set(xscale="log", xlabel="visual tokens V (LLM size fills the rest of the budget)",
              ylabel="fitted error", title=f"inference-optimal V, Q = {optima[0]['text_tokens']}"
              if optima else "")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(results: str, out: str | None = None, budgets: list[float] = (),
         text_tokens: int = 50) -> Fit:
    """Fit a results.csv, print the constants and the optimal V per budget (FLOPs), plot."""
    data = read_results(results)
    result = fit(*data)
    n = data[0]
    # Default budgets: the compute of the sweep's sizes at 16 visual tokens.
    budgets = list(budgets) or [2 * size * 1e9 * (text_tokens + 16) for size in np.unique(n)]
    optima = [optimal_tokens(result, c, text_tokens) for c in budgets]
    print(report(result, optima))
    out = Path(out) if out else Path(results).with_name("scaling_fit.png")
    plot(result, data, optima, out)
    print(f"plot: {out}")
    return result
