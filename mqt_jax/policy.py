"""m chosen per query: the nested tokens make a larger m cheap to try after a smaller one
(`Generator.escalate` keeps the prefix's KV cache), so a request can start small and pay for
more visual tokens only when its answer looks unsure.

- `escalate`: answer on a ladder of m, stop at the first answer whose confidence (a `SIGNALS`
  entry) clears a threshold calibrated on a validation split (`calibrate`), saved with the run
  as policy.json and reused.
- `oracle` (evaluation only): the smallest m on the ladder whose answer is right (the smallest
  rung where none is); the upper bound a policy is measured against.

`simulate` replays a policy on per-m answers already generated (an escalation's answer at each
rung is the one a fresh prefill there gives, tested in test_generate.py), which is how
calibration scores thousands of thresholds without generating again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mqt_jax import benchmarks, flops, splice
from mqt_jax.generate import Generated

POLICIES = ("escalate", "oracle")


def mean_logprob(g: Generated) -> float:
    """The answer's mean token log-probability, the EOS that ended it included."""
    lps = g.logprobs + ([g.eos_logprob] if g.eos_logprob is not None else [])
    return float(np.mean(lps)) if lps else 0.0


def first_margin(g: Generated) -> float:
    """The first token's log-probability lead over the runner-up."""
    return g.margin


SIGNALS = {"mean_logprob": mean_logprob, "margin": first_margin}


def default_ladder(num_queries: int) -> tuple[int, ...]:
    """2 -> 8 -> 32 -> M, the rungs below M that exist."""
    return tuple(m for m in (2, 8, 32) if m < num_queries) + (num_queries,)


@dataclasses.dataclass(frozen=True)
class Escalate:
    ladder: tuple[int, ...]
    signal: str = "mean_logprob"
    threshold: float = float("inf")  # inf: always climb to the top rung
    calibration: dict = dataclasses.field(default_factory=dict, compare=False)  # how it was set

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"confidence signal {self.signal!r}: expected one of {sorted(SIGNALS)}")
        if list(self.ladder) != sorted(set(self.ladder)) or not self.ladder:
            raise ValueError(f"ladder {list(self.ladder)}: m must increase along it")

    def accept(self, g: Generated) -> bool:
        return SIGNALS[self.signal](g) >= self.threshold

    def save(self, path: Path) -> None:
        from mqt_jax.train import write_atomic

        write_atomic(path, json.dumps({"policy": "escalate", **dataclasses.asdict(self),
                                       "ladder": list(self.ladder)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Escalate:
        try:
            saved = json.loads(Path(path).read_text())
            return cls(tuple(saved["ladder"]), saved["signal"], float(saved["threshold"]),
                       saved.get("calibration", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a saved escalation policy ({e})") from None


# ---------------------------------------------------------------- replaying on per-m answers
@dataclasses.dataclass
class Outcome:
    """Per question: the m answered at, every m tried, right or wrong, prefill FLOPs."""

    m: np.ndarray
    correct: np.ndarray
    flops: np.ndarray
    tried: list[tuple[int, ...]]

    def summary(self) -> dict:
        n = len(self.correct)
        return {"accuracy": 100 * float(self.correct.mean()),
                "stderr": 100 * float(self.correct.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
                "mean_m": float(self.m.mean()), "tflops": float(self.flops.mean()) / 1e12}


class Sweep:
    """Answers to the same questions at every m of a ladder (or more), their correctness, and
    what each question's prompt costs: the facts every policy is replayed on."""

    def __init__(self, model_config, prompts: list[splice.Example],
                 answers: dict[int, list[Generated]], correct: dict[int, np.ndarray]):
        self.model_config, self.answers, self.correct = model_config, answers, correct
        at = [list(p.tokens).index(splice.IMAGE_TOKEN) for p in prompts]
        self.before = np.array(at)
        self.after = np.array([len(p.tokens) - 1 - a for p, a in zip(prompts, at)])
        self._confidence, self._climbs = {}, {}

    def fixed(self, m: int) -> Outcome:
        cost = np.array([flops.inference_flops(self.model_config, m, b + a)["total"]
                         for b, a in zip(self.before, self.after)])
        n = len(self.before)
        return Outcome(np.full(n, m), self.correct[m], cost, [(m,)] * n)

    def escalate(self, policy: Escalate) -> Outcome:
        ladder, n = list(policy.ladder), len(self.before)
        sure = np.stack([self.confidence(policy.signal, m) >= policy.threshold for m in ladder])
        sure[-1] = True  # the top rung answers whatever its confidence
        stop = sure.argmax(0)  # the first rung each question accepts
        cost = self._climb_cost(tuple(ladder))[stop, np.arange(n)]
        chosen = np.array(ladder)[stop]
        correct = np.stack([self.correct[m] for m in ladder])[stop, np.arange(n)]
        return Outcome(chosen, correct, cost, [tuple(ladder[: k + 1]) for k in stop])

    def confidence(self, signal: str, m: int) -> np.ndarray:
        key = (signal, m)
        if key not in self._confidence:
            self._confidence[key] = np.array([SIGNALS[signal](g) for g in self.answers[m]])
        return self._confidence[key]

    def _climb_cost(self, ladder: tuple[int, ...]) -> np.ndarray:
        """[rungs, questions]: prefill FLOPs of climbing to each rung (cached per ladder)."""
        if ladder not in self._climbs:
            self._climbs[ladder] = np.array([
                [flops.escalation_prefill_flops(self.model_config, ladder[: k + 1], b, a)
                 for b, a in zip(self.before, self.after)] for k in range(len(ladder))])
        return self._climbs[ladder]

    def oracle(self, ladder) -> Outcome:
        """The smallest m whose answer is right (the smallest rung where none is: no m helps),
        paid for as one answer at that m: a policy that knew."""
        chosen = [next((m for m in ladder if self.correct[m][i]), ladder[0])
                  for i in range(len(self.before))]
        cost = np.array([flops.inference_flops(self.model_config, m, b + a)["total"]
                         for m, b, a in zip(chosen, self.before, self.after)])
        correct = np.array([self.correct[m][i] for i, m in enumerate(chosen)])
        return Outcome(np.array(chosen), correct, cost, [(m,) for m in chosen])


def calibrate(sweep: Sweep, ladder, signal: str, target_accuracy: float | None = None,
              tflops_budget: float | None = None) -> Escalate:
    """The threshold for `signal` on a validation sweep: with `target_accuracy` (%), the
    cheapest one whose accuracy reaches it (the most accurate where none does); with
    `tflops_budget`, the most accurate one whose mean prefill TFLOPs stay within it (the
    cheapest where none does). Every distinct confidence value is a candidate."""
    if (target_accuracy is None) == (tflops_budget is None):
        raise ValueError("calibrate to a target accuracy or to a TFLOPs budget (one of them)")
    confidences = np.concatenate([sweep.confidence(signal, m) for m in ladder[:-1]])
    candidates = sorted(set(confidences.tolist())) + [float("inf")]
    scored = []
    for t in candidates:
        s = sweep.escalate(Escalate(tuple(ladder), signal, t)).summary()
        scored.append((t, s))
    if target_accuracy is not None:
        ok = [(s["tflops"], -s["accuracy"], t) for t, s in scored if s["accuracy"] >= target_accuracy]
        pick = min(ok)[2] if ok else max(scored, key=lambda ts: (ts[1]["accuracy"], -ts[1]["tflops"]))[0]
        goal = {"target_accuracy": target_accuracy}
    else:
        ok = [(-s["accuracy"], s["tflops"], t) for t, s in scored if s["tflops"] <= tflops_budget]
        pick = min(ok)[2] if ok else min(scored, key=lambda ts: ts[1]["tflops"])[0]
        goal = {"tflops_budget": tflops_budget}
    chosen = dict(scored)[pick]
    return Escalate(tuple(ladder), signal, pick, {**goal, "validation": chosen,
                                                   "reached": bool(ok)})


# ------------------------------------------------------------------ `mqt-jax eval --m auto`
def answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images, m_values,
                 show: bool, desc: str) -> tuple[Sweep, dict[int, float]]:
    """Every question answered at every m (each m a fresh run, vision pass included, timed
    after a warm-up over the same batches): the Sweep, and ms per request at each m."""
    import time

    from tqdm.auto import tqdm

    answers, correct, ms = {}, {}, {}
    stops = generator.stops(tokenizer)
    for m in tqdm(m_values, desc=desc, unit="m", disable=not show):
        generator.generate(prompts, images, m, stops)  # compiles every bucket
        start = time.perf_counter()
        answers[m] = generator.generate(prompts, images, m, stops)
        ms[m] = 1e3 * (time.perf_counter() - start) / len(prompts)
        texts = {q.question_id: generator.text(g.ids, tokenizer)
                 for q, g in zip(questions, answers[m])}
        ok = bench.correct(texts, questions, refs)
        correct[m] = np.array([ok[q.question_id] for q in questions])
    return Sweep(generator.model_config, prompts, answers, correct), ms


def calibrated(generator, tokenizer, config, validation: tuple[str, str], policy_file: Path, about: dict,
               ladder, show: bool) -> Escalate:
    """The run's saved policy when it was calibrated for this step and ladder; else one
    calibrated now on the validation split to the fixed-M validation accuracy, with the
    confidence signal that gets there cheapest, and saved."""
    from mqt_jax.evaluate import load_benchmark

    if policy_file.exists():
        saved = Escalate.load(policy_file)
        if saved.ladder == tuple(ladder) and saved.calibration.get("step") == about.get("step"):
            return saved
    if not validation[0]:
        raise ValueError("calibrating needs a validation split: give --val_questions and "
                         "--val_answers (the held-out questions never choose a threshold)")
    val_config = dataclasses.replace(config, questions=validation[0], answers=validation[1],
                                     limit=0)
    bench, questions, refs, prompts, images, _ = load_benchmark(val_config, generator.model_config)
    sweep, _ = answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images,
                            list(ladder), show, "calibrate on validation")
    top = sweep.fixed(ladder[-1]).summary()
    options = [calibrate(sweep, ladder, signal, target_accuracy=top["accuracy"]) for signal in SIGNALS]
    best = min(options, key=lambda p: (not p.calibration["reached"], p.calibration["validation"]["tflops"]))
    half = calibrate(sweep, ladder, best.signal, tflops_budget=top["tflops"] / 2)
    variants = {f"{p.signal}, match M": p for p in options}
    variants[f"{half.signal}, half M's TFLOPs"] = half
    best = dataclasses.replace(best, calibration={
        **best.calibration, "step": about.get("step"), "run": about.get("run"),
        "questions": validation[0], "fixed_M": top,
        "variants": {name: {"signal": p.signal, "threshold": p.threshold, **p.calibration}
                     for name, p in variants.items()}})
    best.save(policy_file)
    return best


def evaluate_policies(model_config, params, config, mesh, out_dir: Path, policy_file: Path,
                      validation: tuple[str, str] = ("", ""), about: dict | None = None) -> dict:
    """`mqt-jax eval --m auto`: every fixed m, the oracle and the calibrated escalation on the
    held-out questions; accuracy (± standard error), mean m, mean prefill TFLOPs per request
    (an escalation's climb included) and measured ms per request. Writes policies.json, .md
    and .png (accuracy against mean TFLOPs) into out_dir."""
    import time

    import jax

    from mqt_jax.evaluate import load_benchmark, m_values_for
    from mqt_jax.generate import Generator, SamplingConfig

    about = about or {}
    if not model_config.has_m or not splice.tokens_reusable(model_config):
        raise ValueError(f"--m auto needs nested tokens that serve every m (the official "
                         f"resampler or the causal qformer), not {model_config.query.variant!r}")
    bench, questions, refs, prompts, images, tokenizer = load_benchmark(config, model_config)
    bench.correct({}, questions[:1], refs)  # a benchmark without per-question scores: now
    ladder = default_ladder(model_config.num_queries)
    m_values = sorted(set(m_values_for(config, model_config)) | set(ladder))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=config.max_new_tokens)
    generator = Generator(model_config, params, mesh, tokenizer.eos_id, greedy,
                          batch_size=config.batch_size, bucket=config.bucket)
    show = jax.process_index() == 0
    policy = calibrated(generator, tokenizer, config, validation, policy_file, about, ladder, show)
    sweep, ms = answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images,
                             m_values, show, f"eval {bench.name} at every m")
    stops = generator.stops(tokenizer)
    generator.escalate(prompts, images, ladder, policy.accept, stops)  # warm-up
    start = time.perf_counter()
    ran = generator.escalate(prompts, images, ladder, policy.accept, stops)
    escalate_ms = 1e3 * (time.perf_counter() - start) / len(prompts)
    replayed = sweep.escalate(policy)
    rows = [{"policy": f"m = {m}", **sweep.fixed(m).summary(), "ms": ms[m]} for m in m_values]
    variants = policy.calibration.get("variants") or {"saved": dataclasses.asdict(policy)}
    for name, v in variants.items():
        variant = Escalate(policy.ladder, v["signal"], v["threshold"])
        saved = variant == policy  # the one run for real and timed; the others are replayed
        rows.append({"policy": f"escalate ({name}: {v['signal']} >= {v['threshold']:.3g}"
                     f"{'; saved' if saved else ''})",
                     **(replayed if saved else sweep.escalate(variant)).summary(),
                     "ms": escalate_ms if saved else None})
    rows.append({"policy": "oracle", **sweep.oracle(ladder).summary(), "ms": None})
    results = {"benchmark": bench.name, "questions": len(questions), **about,
               "ladder": list(ladder), "policy": json.loads(json.dumps(dataclasses.asdict(policy))),
               "rows": rows,
               "escalate_run_agrees": int(sum(g.m == m for g, m in zip(ran, replayed.m))),
               "escalate_run_answers_equal": int(sum(g.ids == sweep.answers[g.m][i].ids
                                                     for i, g in enumerate(ran)))}
    if isinstance(bench, benchmarks.Shapes):
        results["majority_baseline"] = bench.majority_baseline(questions, refs)["score"]
    if show:
        write_policies(results, out_dir)
    return results


def policy_table(results: dict) -> str:
    top = next(r for r in results["rows"] if r["policy"] == f"m = {results['ladder'][-1]}")
    lines = ["| policy | accuracy | mean m | prefill GFLOPs / request | of m = M | ms / request |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ms = "" if r["ms"] is None else f"{r['ms']:.1f}"
        lines.append(f"| {r['policy']} | {r['accuracy']:.1f} ± {r['stderr']:.1f} | "
                     f"{r['mean_m']:.1f} | {1e3 * r['tflops']:.4g} | "
                     f"{100 * r['tflops'] / top['tflops']:.0f}% | {ms} |")
    if "majority_baseline" in results:
        lines.append(f"| majority baseline | {results['majority_baseline']:.1f} |  |  |  |  |")
    return "\n".join(lines) + "\n"


def write_policies(results: dict, out_dir: Path) -> None:
    from mqt_jax.train import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "policies.json", json.dumps(results, indent=1))
    about = "".join(f", {k} {results[k]}" for k in ("run", "step", "date") if k in results)
    note = (f"\nThe saved escalation, run for real: {results['escalate_run_agrees']} of "
            f"{results['questions']} questions stopped at the m the replay chose, "
            f"{results['escalate_run_answers_equal']} answered with the tokens of a fresh "
            f"answer at that m. Ladder {results['ladder']}; ms per request in batches of the "
            f"eval's batch size, vision pass included.\n")
    write_atomic(out_dir / "policies.md", f"{results['benchmark']}: {results['questions']} "
                 f"questions{about}\n\n" + policy_table(results) + note)
    plot_frontier(results, out_dir / "policies.png")


def plot_frontier(results: dict, path: Path) -> None:
    """Accuracy against mean prefill GFLOPs per request: the fixed-m curve with standard
    errors, each policy's point, the oracle; PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mqt_jax.evaluate import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    fixed = [r for r in results["rows"] if r["policy"].startswith("m = ")]
    ax.errorbar([1e3 * r["tflops"] for r in fixed], [r["accuracy"] for r in fixed],
                yerr=[r["stderr"] for r in fixed], fmt="o-", capsize=3, color="tab:blue",
                label="fixed m")
    for r in fixed:
        ax.annotate(r["policy"].removeprefix("m = "), (1e3 * r["tflops"], r["accuracy"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
    markers = iter(["D", "^", "v", "P", "X"])
    for r in results["rows"]:
        if r in fixed:
            continue
        style = dict(color="black", marker="*", ms=11) if r["policy"] == "oracle" else dict(marker=next(markers), ms=7)
        ax.errorbar([1e3 * r["tflops"]], [r["accuracy"]], yerr=[r["stderr"]], capsize=3,
                    ls="none", label=r["policy"], **style)
    if "majority_baseline" in results:
        ax.axhline(results["majority_baseline"], color="grey", ls=":", label="majority baseline")
    ax.set_xlabel("mean prefill GFLOPs per request")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=7)
    save_figure(fig, path)
