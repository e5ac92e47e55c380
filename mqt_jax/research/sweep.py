"""Ablation sweeps: a gin file of bindings expanded into runs, trained and evaluated one after
another (or printed as launch commands), collected into one table and one plot.

A sweep file (configs/sweeps/*.gin) binds `Sweep`: the gin files every run starts from,
bindings common to all, and per method the bindings that make it; a binding whose value is
a Python list is swept (the product of all lists of a method gives its runs):

    Sweep.methods = {
        "avgpool": {"QueryTransformerConfig.variant": "avgpool",
                    "QueryTransformerConfig.num_queries": [1, 4, 16]},
    }

Each run lives in W/<run>/ (a `mqt-jax train` workdir: resumable) and is complete once its
W/<run>/eval/<benchmark>/eval.json exists; complete runs are skipped. The collection goes to
W/results.csv, results.md and results.png (+ .pdf): score (± its standard error) against visual
tokens and against prefill GFLOPs, one line per method (an MQT model contributes one point per
evaluated m). Collection reads only W/<run>/eval/*/eval.json and W/<run>/sweep_run.json, so
those files alone (copied from the machines that ran them) rebuild the tables.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import re
import shlex
import time
from pathlib import Path

from mqt_jax.config import Sweep
from mqt_jax.core.outputs import write_atomic


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # its folder under the sweep's workdir
    method: str  # its line in the plot
    bindings: tuple[str, ...]


def gin_value(value) -> str:
    """A Python value as gin text; strings starting with @ or % are references, kept as is."""
    if isinstance(value, str) and value[:1] in ("@", "%"):
        return value
    return repr(value)


def expand(sweep: Sweep) -> list[Run]:
    """One Run per method and combination of its swept (list-valued) bindings."""
    runs = []
    for method, spec in sweep.methods.items():
        swept = {k: v for k, v in spec.items() if isinstance(v, list)}
        fixed = [f"{k} = {gin_value(v)}" for k, v in spec.items() if k not in swept]
        for combo in itertools.product(*swept.values()):
            chosen = dict(zip(swept, combo))
            suffix = "".join(f"_{k.split('.')[-1]}{v}" for k, v in chosen.items())
            name = re.sub(r"[^a-z0-9.]+", "-", method.lower()).strip("-") + suffix.lower()
            runs.append(Run(name, method, tuple(sweep.common) + tuple(fixed) + tuple(
                f"{k} = {gin_value(v)}" for k, v in chosen.items())))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a folder name: {sorted(n for n in names if names.count(n) > 1)}")
    return runs


def load_sweep(sweep_file: str) -> tuple[Sweep, list[Run]]:
    from mqt_jax.core.gin_files import parse_gin

    parse_gin([sweep_file], [])
    sweep = Sweep()
    return sweep, expand(sweep)


def is_complete(run_dir: Path) -> bool:
    return any(run_dir.glob("eval/*/eval.json"))


def launch_command(run: Run, sweep: Sweep, workdir: Path, launcher: str = "") -> str:
    """The shell command that trains and evaluates one run (behind a launch script's prefix,
    e.g. "launch/tpu_vm.sh --name N --zone Z --type T --")."""
    args = ["mqt-jax", "train"]
    for f in sweep.base:
        args += ["--gin_file", f]
    for b in run.bindings:
        args += ["--gin_param", b]
    args += ["--workdir", str(workdir / run.name)]
    return (launcher + " " if launcher else "") + " ".join(shlex.quote(a) for a in args)


def run_all(sweep_file: str, workdir: str | Path, only: list[str] = ()) -> list[dict]:
    """Train and evaluate every incomplete run in this process, one after another, then
    collect. The persistent compilation cache in W/.jax_cache lets runs (and reruns) whose
    programs agree reuse each other's compiled functions; m is data, so no run compiles per m."""
    from mqt_jax.core.gin_files import parse_gin
    from mqt_jax.training.recipe import run as run_recipe

    workdir = Path(workdir)
    sweep, runs = load_sweep(sweep_file)
    unknown = sorted(set(only) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"--only {unknown}: not runs of this sweep ({[r.name for r in runs]})")
    todo = [r for r in runs if (not only or r.name in only) and not is_complete(workdir / r.name)]
    print(f"sweep {sweep_file}: {len(runs)} runs, {len(runs) - len(todo)} complete, "
          f"{len(todo)} to run in {workdir}")
    with persistent_cache(workdir / ".jax_cache"):
        for i, r in enumerate(todo, 1):
            print(f"=== [{i}/{len(todo)}] {r.name}: " + "; ".join(r.bindings))
            parse_gin(list(sweep.base), list(r.bindings))
            start = time.perf_counter()
            run_recipe(str(workdir / r.name))
            record = {"method": r.method, "bindings": list(r.bindings),
                      "wall_s": round(time.perf_counter() - start, 1)}
            write_atomic(workdir / r.name / "sweep_run.json", json.dumps(record, indent=1))
    return collect(sweep_file, workdir)


@contextlib.contextmanager
def persistent_cache(directory: Path):
    """JAX's persistent compilation cache in `directory` for the duration only: JAX opens
    its cache once per process, so the previous settings come back with a reset."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {n: getattr(jax.config, n) for n in names}
    compilation_cache.reset_cache()
    jax.config.update(names[0], str(directory))
    jax.config.update(names[1], 0.5)
    try:
        yield
    finally:
        compilation_cache.reset_cache()
        for n, v in before.items():
            jax.config.update(n, v)


# ------------------------------------------------------------------------------ collection
COLUMNS = ("method", "run", "m", "tokens", "score", "stderr", "gflops", "prefill_ms", "llm_params",
           "wall_s")


def llm_params(sweep: Sweep, run: Run) -> int:
    """The run's LLM parameters (from its gin bindings: the scaling law's N)."""
    from mqt_jax.config import ModelConfig
    from mqt_jax.core.flops import llm_parameters
    from mqt_jax.core.gin_files import parse_gin

    parse_gin(list(sweep.base), list(run.bindings))
    return llm_parameters(ModelConfig().llm)


def collect(sweep_file: str, workdir: str | Path) -> list[dict]:
    """W/results.csv, results.md and results.png over the runs complete so far."""
    workdir = Path(workdir)
    sweep, runs = load_sweep(sweep_file)
    rows, missing = [], []
    for r in runs:
        found = sorted((workdir / r.name).glob("eval/*/eval.json"))
        if not found:
            missing.append(r.name)
            continue
        results = json.loads(found[0].read_text())
        meta = workdir / r.name / "sweep_run.json"
        wall = json.loads(meta.read_text()).get("wall_s") if meta.is_file() else None
        n = llm_params(sweep, r)
        for row in results["rows"]:
            rows.append({"method": r.method, "run": r.name, "m": row["m"],
                         "tokens": row.get("tokens", row["m"]), "score": row.get("score"),
                         "stderr": row.get("stderr", {}).get("score"),
                         "gflops": None if row.get("tflops") is None else 1e3 * row["tflops"],
                         "prefill_ms": row.get("prefill_ms"),
                         "llm_params": n, "wall_s": wall, "benchmark": results["benchmark"],
                         "majority": results.get("majority_baseline", {}).get("score")})
    if rows:
        write_results(rows, workdir)
    print(f"collected {len(rows)} rows from {len(runs) - len(missing)} of {len(runs)} runs"
          + (f"; not complete: {missing}" if missing else "") + f"; tables in {workdir}")
    return rows


def write_results(rows: list[dict], workdir: Path) -> None:
    from mqt_jax.core.outputs import fmt, markdown_table, with_error

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    writer.writerows([row[c] if row[c] is not None else "" for c in COLUMNS] for row in rows)
    write_atomic(workdir / "results.csv", buf.getvalue())
    # Markdown: score by method (rows) and visual tokens (columns), then every row.
    tokens = sorted({r["tokens"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["tokens"]): with_error(r["score"], r["stderr"]) for r in rows}
    lines = [f"Score (%) on {rows[0]['benchmark']} (± standard error) by visual tokens in the LLM:",
             "",
             markdown_table(["method"] + tokens,
                            [[m] + [cell.get((m, t), "") for t in tokens] for m in methods])]
    if rows[0]["majority"] is not None:
        lines += ["", f"Majority-answer baseline: {fmt(rows[0]['majority'])}"]
    lines += ["", markdown_table(COLUMNS, [[r[c] if isinstance(r[c], str) else fmt(r[c])
                                            for c in COLUMNS] for r in rows])]
    write_atomic(workdir / "results.md", "\n".join(lines) + "\n")
    plot_results(rows, workdir / "results.png")


def plot_results(rows: list[dict], path: Path) -> None:
    """Score (error bars: standard errors) against visual tokens and against prefill GFLOPs
    (log axes, ticks at the evaluated token counts), a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from mqt_jax.core.outputs import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120, sharey=True, layout="constrained")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        style = dict(marker="os^vDP*Xhp"[i % 10], label=method, color=f"C{i % 10}", capsize=3,
                     ls="-", ms=5)
        # Methods at the same token count would hide each other: nudge each a little sideways.
        nudge = {"tokens": 1.0 + 0.04 * (i - (len(methods) - 1) / 2), "gflops": 1.0}
        for ax, key in zip(axes, nudge):
            have = [r for r in mine if r[key] is not None]
            ax.errorbar([r[key] * nudge[key] for r in have], [r["score"] for r in have],
                        yerr=[r["stderr"] or 0.0 for r in have], **style)
    for ax, label in zip(axes, ("visual tokens in the LLM", "prefill GFLOPs per request")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if rows[0]["majority"] is not None:
            ax.axhline(rows[0]["majority"], color="grey", ls=":", label="majority answer")
    tokens = sorted({r["tokens"] for r in rows})
    axes[0].set_xticks(tokens, [str(t) for t in tokens])
    axes[0].minorticks_off()
    axes[1].xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.02, not 2 x 10^-2
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_ylabel(f"{rows[0]['benchmark']} score (%)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right center")
    save_figure(fig, path)
