"""Offline side of m chosen per query: calibrating escalation's threshold and the router's
slack on a validation split, training the router on a training split's per-m correctness, and
the accuracy-against-FLOPs table and frontier plot of `mqt-jax eval --m auto`.

A `Sweep` replays a policy on per-m answers already generated (an escalation's answer at each
rung is the one a fresh prefill there gives, tested in test_generate.py), which is how
calibration scores thousands of thresholds without generating again. The policies themselves,
as they run when serving, are in mqt_jax/inference/policy.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from mqt_jax.core import flops, sharding, splice
from mqt_jax.inference.generate import Generated
from mqt_jax.inference.policy import (
    SIGNALS,
    Escalate,
    Router,
    default_ladder,
    embedding_table,
    router_features,
)


def train_router(features: np.ndarray, correct: np.ndarray, ladder, steps: int = 500,
                 learning_rate: float = 0.03, weight_decay: float = 0.01) -> Router:
    """A logistic head per rung on standardised features: correct [N, rungs] (bool), fitted
    full-batch with AdamW on the mean binary cross-entropy."""
    import jax
    import jax.numpy as jnp
    import optax

    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / scale, jnp.float32)
    y = jnp.asarray(correct, jnp.float32)
    params = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros(y.shape[1])}
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p):
        return optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y).mean()

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return Router(tuple(int(m) for m in ladder), np.asarray(params["w"], np.float64),
                  np.asarray(params["b"], np.float64), mean, scale,
                  calibration={"train_questions": len(features),
                               "train_loss": float(loss(params)),
                               "train_base_rates": correct.mean(0).round(4).tolist()})


def log_loss(p: np.ndarray, correct: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(correct * np.log(p) + (1 - correct) * np.log(1 - p)).mean())


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
        return self.at(np.full(len(self.before), m))

    def at(self, chosen, extra_flops: float = 0.0) -> Outcome:
        """Each question answered once, at its own m (chosen [N]), paid for as that answer."""
        cost = np.array([flops.inference_flops(self.model_config, m, b + a)["total"]
                         for m, b, a in zip(chosen, self.before, self.after)]) + extra_flops
        correct = np.array([self.correct[m][i] for i, m in enumerate(chosen)])
        return Outcome(np.array(chosen), correct, cost, [(int(m),) for m in chosen])

    def route(self, router: Router, features: np.ndarray, slack: float | None = None) -> Outcome:
        rungs = router.rungs(features, slack)
        return self.at(np.array(router.ladder)[rungs], router.head_flops())

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
        return self.at([next((m for m in ladder if self.correct[m][i]), ladder[0])
                        for i in range(len(self.before))])


def pick(scored: list[tuple[float, dict]], target_accuracy: float | None,
         tflops_budget: float | None) -> tuple[float, dict]:
    """Among (setting, validation summary) pairs: with `target_accuracy` (%), the cheapest
    setting that reaches it (the most accurate where none does); with `tflops_budget`, the
    most accurate within it (the cheapest where none does). (setting, calibration record)."""
    if (target_accuracy is None) == (tflops_budget is None):
        raise ValueError("calibrate to a target accuracy or to a TFLOPs budget (one of them)")
    if target_accuracy is not None:
        ok = [(s["tflops"], -s["accuracy"], t) for t, s in scored if s["accuracy"] >= target_accuracy]
        best = min(ok)[2] if ok else max(scored, key=lambda ts: (ts[1]["accuracy"], -ts[1]["tflops"]))[0]
        goal = {"target_accuracy": target_accuracy}
    else:
        ok = [(-s["accuracy"], s["tflops"], t) for t, s in scored if s["tflops"] <= tflops_budget]
        best = min(ok)[2] if ok else min(scored, key=lambda ts: ts[1]["tflops"])[0]
        goal = {"tflops_budget": tflops_budget}
    return best, {**goal, "validation": dict(scored)[best], "reached": bool(ok)}


def calibrate(sweep: Sweep, ladder, signal: str, target_accuracy: float | None = None,
              tflops_budget: float | None = None) -> Escalate:
    """The threshold for `signal` on a validation sweep (see `pick`); every distinct
    confidence value is a candidate."""
    confidences = np.concatenate([sweep.confidence(signal, m) for m in ladder[:-1]])
    candidates = sorted(set(confidences.tolist())) + [float("inf")]
    scored = [(t, sweep.escalate(Escalate(tuple(ladder), signal, t)).summary()) for t in candidates]
    threshold, record = pick(scored, target_accuracy, tflops_budget)
    return Escalate(tuple(ladder), signal, threshold, record)


def calibrate_router(sweep: Sweep, router: Router, features: np.ndarray,
                     target_accuracy: float | None = None,
                     tflops_budget: float | None = None) -> Router:
    """The router's slack on a validation sweep (see `pick`); every distinct gap between a
    rung's prediction and its question's best is a candidate. Records the validation
    log-loss next to predicting the training base rates (does the head know anything?)."""
    p = router.predict(features)
    candidates = sorted(set((p.max(1, keepdims=True) - p).ravel().tolist()))
    scored = [(t, sweep.route(router, features, t).summary()) for t in candidates]
    slack, record = pick(scored, target_accuracy, tflops_budget)
    correct = np.stack([sweep.correct[m] for m in router.ladder], 1)
    base = np.broadcast_to(np.array(router.calibration["train_base_rates"]), p.shape)
    record.update(val_log_loss=log_loss(p, correct), val_log_loss_base_rates=log_loss(base, correct))
    return dataclasses.replace(router, slack=float(slack),
                               calibration={**router.calibration, **record})


# ------------------------------------------------------------------ `mqt-jax eval --m auto`
def answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images, m_values,
                 show: bool, desc: str, visual=None) -> tuple[Sweep, dict[int, float]]:
    """Every question answered at every m: the Sweep, and ms per request at each m (each m a
    fresh run, vision pass included, timed after a warm-up over the same batches). With
    `visual` (the images' tokens from `Generator.visual_tokens`) every m reuses them and
    nothing is timed: a split that only fits a policy."""
    import time

    from tqdm.auto import tqdm

    answers, correct, ms = {}, {}, {}
    stops = generator.stops(tokenizer)
    for m in tqdm(m_values, desc=desc, unit="m", disable=not show):
        if visual is None:
            generator.generate(prompts, images, m, stops)  # compiles every bucket
        start = time.perf_counter()
        answers[m] = generator.generate(prompts, images, m, stops, visual)
        if visual is None:
            ms[m] = 1e3 * (time.perf_counter() - start) / len(prompts)
        texts = {q.question_id: generator.text(g.ids, tokenizer)
                 for q, g in zip(questions, answers[m])}
        ok = bench.correct(texts, questions, refs)
        correct[m] = np.array([ok[q.question_id] for q in questions])
    return Sweep(generator.model_config, prompts, answers, correct), ms


@dataclasses.dataclass
class Split:
    """A question split answered at every rung, and what the router reads of each question."""

    sweep: Sweep
    features: np.ndarray


def answer_split(generator, tokenizer, config, files: tuple[str, str], ladder, show: bool,
                 desc: str, limit: int = 0) -> Split:
    from mqt_jax.evaluation.evaluate import load_benchmark

    split_config = dataclasses.replace(config, questions=files[0], answers=files[1], limit=limit)
    bench, questions, refs, prompts, images, _ = load_benchmark(split_config, generator.model_config)
    visual = generator.visual_tokens(images)
    sweep, _ = answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images,
                            list(ladder), show, desc, visual)
    return Split(sweep, router_features(embedding_table(generator.params), visual, prompts, ladder[0]))


def reusable(kind, path: Path, about: dict, ladder):
    """The policy saved at `path` if it was fitted for this step and ladder, else None."""
    if path.exists():
        saved = kind.load(path)
        if saved.ladder == tuple(ladder) and saved.calibration.get("step") == about.get("step"):
            return saved
    return None


def calibrated(validation, policy_file: Path, about: dict, ladder) -> Escalate:
    """The run's saved escalation when it was calibrated for this step and ladder; else one
    calibrated now on the validation split (`validation()`: its Split) to the fixed-M
    validation accuracy, with the confidence signal that gets there cheapest, and saved."""
    saved = reusable(Escalate, policy_file, about, ladder)
    if saved:
        return saved
    sweep = validation().sweep
    top = sweep.fixed(ladder[-1]).summary()
    options = [calibrate(sweep, ladder, signal, target_accuracy=top["accuracy"]) for signal in SIGNALS]
    best = min(options, key=lambda p: (not p.calibration["reached"], p.calibration["validation"]["tflops"]))
    half = calibrate(sweep, ladder, best.signal, tflops_budget=top["tflops"] / 2)
    variants = {f"{p.signal}, match M": p for p in options}
    variants[f"{half.signal}, half M's TFLOPs"] = half
    best = dataclasses.replace(best, calibration={
        **best.calibration, "step": about.get("step"), "run": about.get("run"), "fixed_M": top,
        "variants": {name: {"signal": p.signal, "threshold": p.threshold, **p.calibration}
                     for name, p in variants.items()}})
    best.save(policy_file)
    return best


def routed(training, validation, router_file: Path, about: dict, ladder) -> Router:
    """The run's saved router when it was trained for this step and ladder; else one trained
    now on the training split's per-rung correctness (`training()`: its Split), its slack
    calibrated on the validation split to the fixed-M validation accuracy, and saved."""
    saved = reusable(Router, router_file, about, ladder)
    if saved:
        return saved
    train = training()
    router = train_router(train.features, np.stack([train.sweep.correct[m] for m in ladder], 1), ladder)
    val = validation()
    top = val.sweep.fixed(ladder[-1]).summary()
    router = calibrate_router(val.sweep, router, val.features, target_accuracy=top["accuracy"])
    router = dataclasses.replace(router, calibration={
        **router.calibration, "step": about.get("step"), "run": about.get("run"), "fixed_M": top})
    router.save(router_file)
    return router


def evaluate_run_policies(run, config, out_dir: Path) -> dict:
    """`evaluate_policies` on an opened run (mqt_jax.run.TrainedRun) with `config`'s splits."""
    import datetime

    about = {"run": str(run.path.absolute()), "step": run.step,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with sharding.activate(run.mesh):
        return evaluate_policies(run.model_config, run.params, config, run.mesh, out_dir,
                                 run.path, (config.val_questions, config.val_answers),
                                 (config.train_questions, config.train_answers), about)


def evaluate_policies(model_config, params, config, mesh, out_dir: Path, run_dir: Path,
                      validation: tuple[str, str] = ("", ""), training: tuple[str, str] = ("", ""),
                      about: dict | None = None) -> dict:
    """`mqt-jax eval --m auto`: every fixed m, the oracle, the calibrated escalation and the
    router on the held-out questions; accuracy (± standard error), mean m, mean prefill
    TFLOPs per request (an escalation's climb included) and measured ms per request. The
    policies are calibrated (and the router trained) on first use and saved in run_dir
    (policy.json, router.json). Writes policies.json, .md and .png into out_dir."""
    import functools
    import time

    import jax

    from mqt_jax.config import SamplingConfig
    from mqt_jax.evaluation.evaluate import load_benchmark, m_values_for
    from mqt_jax.inference.generate import Generator

    about = about or {}
    if not model_config.has_m or not splice.tokens_reusable(model_config):
        raise ValueError(f"--m auto needs nested tokens that serve every m (the official "
                         f"resampler or the causal qformer), not {model_config.query.variant!r}")
    ladder = default_ladder(model_config.num_queries)
    fit_escalate = not reusable(Escalate, run_dir / "policy.json", about, ladder)
    saved_router = reusable(Router, run_dir / "router.json", about, ladder)
    if saved_router:
        saved_router.check(model_config)  # a router of another model: said before any answer
    fit_router = saved_router is None
    for needed, files, flags, purpose in (
            (fit_escalate or fit_router, validation, "--val_questions and --val_answers", "calibrating"),
            (fit_router, training, "--train_questions and --train_answers", "training the router")):
        if needed and not (files[0] and files[1]):  # said now, before any answer is generated
            raise ValueError(f"{purpose} needs {flags} (the held-out questions never choose a policy)")
    bench, questions, refs, prompts, images, tokenizer = load_benchmark(config, model_config)
    bench.correct({}, questions[:1], refs)  # a benchmark without per-question scores: now
    m_values = sorted(set(m_values_for(config, model_config)) | set(ladder))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=config.max_new_tokens)
    generator = Generator(model_config, params, mesh, tokenizer.eos_id, greedy,
                          batch_size=config.batch_size, bucket=config.bucket)
    show = jax.process_index() == 0

    def split(files, desc, limit=0):
        return answer_split(generator, tokenizer, config, files, ladder, show, desc, limit)
    val = functools.cache(lambda: split(validation, "calibrate on validation"))
    train = functools.cache(lambda: split(training, "router: training questions",
                                          config.router_questions))
    policy = calibrated(val, run_dir / "policy.json", about, ladder)
    router = routed(train, val, run_dir / "router.json", about, ladder)

    sweep, ms = answer_sweep(generator, tokenizer, bench, questions, refs, prompts, images,
                             m_values, show, f"eval {bench.name} at every m")
    stops = generator.stops(tokenizer)
    embedding = embedding_table(params)

    def escalate():
        return generator.escalate(prompts, images, ladder, policy.accept, stops)

    def route():  # the vision pass, the features, the head, then one answer at each row's m
        visual = generator.visual_tokens(images)
        chosen = router.route(router_features(embedding, visual, prompts, ladder[0]))
        return chosen, generator.generate(prompts, images, chosen, stops, visual)

    timed = {}
    for name, run in (("escalate", escalate), ("router", route)):
        run()  # warm-up: compiles
        start = time.perf_counter()
        timed[name] = (run(), 1e3 * (time.perf_counter() - start) / len(prompts))
    (ran, escalate_ms), ((chosen, routed_answers), router_ms) = timed["escalate"], timed["router"]
    replayed = sweep.escalate(policy)
    rows = [{"policy": f"m = {m}", **sweep.fixed(m).summary(), "ms": ms[m]} for m in m_values]
    variants = policy.calibration.get("variants") or {"saved": dataclasses.asdict(policy)}
    marked = False
    for name, v in variants.items():
        variant = Escalate(policy.ladder, v["signal"], v["threshold"])
        # the saved one (the first variant equal to it): run for real and timed; others replayed
        saved = variant == policy and not marked
        marked = marked or saved
        rows.append({"policy": f"escalate ({name}: {v['signal']} >= {v['threshold']:.3g}"
                     f"{'; saved, what m=auto uses' if saved else ''})",
                     **(replayed if saved else sweep.escalate(variant)).summary(),
                     "ms": escalate_ms if saved else None})
    rows.append({"policy": f"router (slack {router.slack:.3g})",
                 **sweep.at(chosen, router.head_flops()).summary(), "ms": router_ms})
    rows.append({"policy": "oracle", **sweep.oracle(ladder).summary(), "ms": None})
    results = {"benchmark": bench.name, "questions": len(questions), **about,
               "ladder": list(ladder), "policy": json.loads(json.dumps(dataclasses.asdict(policy))),
               "router": {"slack": router.slack, **router.calibration,
                          "chosen": {int(m): int((chosen == m).sum()) for m in ladder}},
               "rows": rows,
               "escalate_run_agrees": int(sum(g.m == m for g, m in zip(ran, replayed.m))),
               "escalate_run_answers_equal": int(sum(g.ids == sweep.answers[g.m][i].ids
                                                     for i, g in enumerate(ran))),
               "router_run_answers_equal": int(sum(g.ids == sweep.answers[int(m)][i].ids
                                                   for i, (g, m) in enumerate(zip(routed_answers, chosen))))}
    baseline = bench.majority_baseline(questions, refs)
    if baseline is not None:
        results["majority_baseline"] = baseline["score"]
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
    from mqt_jax.core.outputs import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "policies.json", json.dumps(results, indent=1))
    about = "".join(f", {k} {results[k]}" for k in ("run", "step", "date") if k in results)
    r = results["router"]
    note = (f"\nThe saved escalation, run for real: {results['escalate_run_agrees']} of "
            f"{results['questions']} questions stopped at the m the replay chose, "
            f"{results['escalate_run_answers_equal']} answered with the tokens of a fresh "
            f"answer at that m. The router, run for real: {results['router_run_answers_equal']} "
            f"answers equal a fresh answer at the m it chose; chosen per rung "
            f"{results['router']['chosen']}; validation log-loss {r['val_log_loss']:.4f} against "
            f"{r['val_log_loss_base_rates']:.4f} for the training base rates. Ladder "
            f"{results['ladder']}; ms per request in batches of the eval's batch size, vision "
            f"pass included.\n")
    write_atomic(out_dir / "policies.md", f"{results['benchmark']}: {results['questions']} "
                 f"questions{about}\n\n" + policy_table(results) + note)
    plot_frontier(results, out_dir / "policies.png")


def plot_frontier(results: dict, path: Path) -> None:
    """Accuracy against mean prefill GFLOPs per request: the fixed-m curve with standard
    errors, each policy's point, the oracle; PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mqt_jax.core.outputs import save_figure

    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=120, layout="constrained")
    fixed = [r for r in results["rows"] if r["policy"].startswith("m = ")]
    ax.errorbar([1e3 * r["tflops"] for r in fixed], [r["accuracy"] for r in fixed],
                yerr=[r["stderr"] for r in fixed], fmt="o-", capsize=3, color="tab:blue",
                label="fixed m")
    for r in fixed:
        ax.annotate(r["policy"].removeprefix("m = "), (1e3 * r["tflops"], r["accuracy"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
    styles = iter(zip(["D", "^", "v", "P", "X", "s"],  # colours apart from the fixed-m curve's
                      ["tab:purple", "tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink"]))
    for r in results["rows"]:
        if r in fixed:
            continue
        marker, colour = next(styles) if r["policy"] != "oracle" else ("*", "black")
        style = dict(marker=marker, color=colour, ms=11 if marker == "*" else 7)
        label = re.sub(r":[^;)]*", "", r["policy"])  # the thresholds are in the table
        ax.errorbar([1e3 * r["tflops"]], [r["accuracy"]], yerr=[r["stderr"]], capsize=3,
                    ls="none", label=label, **style)
    if "majority_baseline" in results:
        ax.axhline(results["majority_baseline"], color="grey", ls=":", label="majority baseline")
    ax.set_xlabel("mean prefill GFLOPs per request")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    save_figure(fig, path)
