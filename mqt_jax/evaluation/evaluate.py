"""Benchmarks at several m: greedy answers to a question file through the sharded `Generator`,
scored by the benchmark's official rules (`mqt_jax.evaluation.benchmarks`), next to each m's analytical
TFLOPs and measured prefill latency.

Writes into the output folder: answers_m<m>.jsonl (LLaVA's answer format), m<m>/ (the
benchmark's submission files), eval.json, and the sweep as eval.csv, eval.md and eval.png
(score against m on a log axis, TFLOPs on a second axis, like the paper's first figure).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mqt_jax.config import EvalConfig, ModelConfig, SamplingConfig
from mqt_jax.core import flops, sharding, splice
from mqt_jax.core.outputs import fmt, markdown_table, save_figure, with_error, write_atomic
from mqt_jax.data.conversation import BadRecord, encode_prompt
from mqt_jax.data.preprocess import BadImage, clip_preprocess, confined, open_image
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.evaluation import benchmarks
from mqt_jax.inference.generate import Generator
from mqt_jax.run import TrainedRun, run_config_file


def m_values_for(config: EvalConfig, model_config: ModelConfig) -> list[int]:
    """The m to evaluate: EvalConfig.m_values up to M (those the compressor serves: M3's
    scales), and M (only M without an m)."""
    big_m = model_config.num_queries
    if not model_config.has_m:
        return [big_m]
    valid = model_config.compressor.valid_m(model_config)
    values = sorted({m for m in config.m_values if m <= big_m and (valid is None or m in valid)}
                    | {big_m})
    model_config.check_m(values)
    return values


def load_images(questions: list[benchmarks.Question], root: str, size: int, mode: str) -> np.ndarray:
    """Each question's image, preprocessed; paths are confined to `root`."""
    cache = {}
    for q in questions:
        key = id(q.image) if isinstance(q.image, Image.Image) else q.image
        if key in cache:
            continue
        if isinstance(q.image, Image.Image):
            image = q.image
        else:
            if not isinstance(q.image, str):
                raise ValueError(f"question {q.question_id}: 'image' is {q.image!r}, not a path")
            try:
                path = confined(root, q.image)
            except BadRecord as e:
                raise ValueError(f"question {q.question_id}: {e}") from None
            if not path.is_file():
                raise FileNotFoundError(f"question {q.question_id}: image {path} not found")
            try:
                image = open_image(path)
            except BadImage as e:
                raise ValueError(f"question {q.question_id}: {e}") from None
        cache[key] = clip_preprocess(image, size, mode)
    return np.stack([cache[id(q.image) if isinstance(q.image, Image.Image) else q.image]
                     for q in questions])


def evaluate(model_config: ModelConfig, params, config: EvalConfig, mesh,
             out_dir: str | Path | None = None, about: dict | None = None) -> dict:
    """Score per m on config.questions; with out_dir, writes the files listed above.
    Returns eval.json's content (`about`, e.g. the run and step scored, goes into it). In a
    multi-process run every process calls it (the batches are spread over all devices; every
    process gets every answer) and process 0 writes."""
    m_values = m_values_for(config, model_config)
    bench, questions, refs, prompts, images, tokenizer = load_benchmark(config, model_config)
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=config.max_new_tokens, stop=())
    generator = Generator(model_config, params, mesh, tokenizer.eos_id, greedy,
                          batch_size=config.batch_size, bucket=config.bucket)
    text_tokens = int(np.mean([len(p.tokens) - 1 for p in prompts]))  # less the image slot
    results = {"benchmark": bench.name, "questions": len(questions), **(about or {}), "rows": []}
    baseline = bench.majority_baseline(questions, refs)
    if baseline is not None:
        results["majority_baseline"] = baseline
    lead = jax.process_index() == 0
    out_dir = Path(out_dir) if out_dir and lead else None
    answers = sweep_answers(generator, prompts, images, m_values, tokenizer, config.reuse_chunk,
                            f"eval {bench.name}", lead)
    results["vision_passes"] = generator.vision_passes
    for m in m_values:
        predictions = {q.question_id: a for q, a in zip(questions, answers[m])}
        row = {"m": m, **bench.score(predictions, questions, refs),
               "tokens": model_config.visual_tokens(m)}  # what the LLM carries (Victor: R)
        row["tflops"] = prefill_tflops(model_config, m, text_tokens)
        row["prefill_ms"] = 1e3 * generator.prefill_seconds(prompts, images, m)
        results["rows"].append(row)
        if out_dir:
            files = {"answers_m%d.jsonl" % m: benchmarks.llava_answers(predictions, questions, m)}
            files.update({f"m{m}/{name}": text for name, text in
                          bench.submission(predictions, questions, refs, m).items()})
            for name, text in files.items():
                (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(out_dir / name, text)
    if out_dir:
        write_sweep(results, out_dir)
    return results


def load_benchmark(config: EvalConfig, model_config: ModelConfig):
    """config's benchmark, checked: (benchmark, questions, references, prompts in the run's
    template, preprocessed images [N, S, S, 3], tokenizer)."""
    bench = benchmarks.get(config.benchmark)
    if config.limit < 0:
        raise ValueError(f"EvalConfig.limit={config.limit}: give a number of questions >= 1 "
                         f"(0: all)")
    if config.reuse_chunk < 1:
        raise ValueError(f"EvalConfig.reuse_chunk={config.reuse_chunk}: must be >= 1")
    questions = bench.questions(config.questions)[: config.limit or None]
    if not questions:
        raise ValueError(f"{config.questions}: no questions")
    repeated = sorted(i for i, n in Counter(q.question_id for q in questions).items() if n > 1)
    if repeated:
        raise ValueError(f"{config.questions}: {len(repeated)} question id(s) appear more than "
                         f"once (answers are kept by id): {repeated[:5]}")
    if bench.needs_references and not config.answers:
        raise ValueError(f"benchmark {bench.name} is scored against references: give the answers file")
    refs = bench.references(config.answers or None, questions)
    tokenizer = load_tokenizer(config.tokenizer_dir)
    prompts = [encode_prompt(q.text, config.template, tokenizer) for q in questions]
    images = load_images(questions, config.image_root, model_config.vision.image_size, config.image_mode)
    return bench, questions, refs, prompts, images, tokenizer


def sweep_answers(generator: Generator, prompts, images, m_values, tokenizer, chunk: int = 1024,
                  desc: str = "sweep", show: bool = False, reuse: bool = True) -> dict[int, list[str]]:
    """Every question's answer at every m. Where the model's tokens serve every m
    (`splice.tokens_reusable`), each image runs through the vision tower and the query
    transformer once for the whole sweep, `chunk` questions at a time (the tokens of a chunk
    are held on the host); otherwise (or with `reuse` False) once per m."""
    reuse = reuse and splice.tokens_reusable(generator.model_config)
    chunk = chunk if reuse else len(prompts)
    answers = {m: [] for m in m_values}
    with tqdm(total=len(m_values) * len(prompts), desc=desc, unit="answer", disable=not show) as bar:
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            visual = generator.visual_tokens(images[part]) if reuse else None
            for m in m_values:
                answers[m] += generator.texts(prompts[part], images[part], m, tokenizer, visual)
                bar.update(len(prompts[part]))
    return answers


def prefill_tflops(model_config: ModelConfig, m: int, text_tokens: int) -> float:
    """Analytical TFLOPs of one request's prefill at m (vision tower, compressor, LLM)."""
    return flops.inference_flops(model_config, m, text_tokens)["total"] / 1e12


# ------------------------------------------------------------------------ the sweep table
def flat_row(row: dict) -> dict:
    """Nested details ("random": {"f1": ...}) as "random/f1" columns; numbers only."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_row(value).items()})
        elif isinstance(value, (int, float)) or value is None:
            out[key] = value
    return out


def columns(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        names += [k for k in row if k not in names]
    first = ["m", "score"]
    last = ["tokens", "tflops", "prefill_ms"]
    return ([c for c in first if c in names] + [c for c in names if c not in first + last]
            + [c for c in last if c in names])


def sweep_tables(results: dict) -> tuple[str, str]:
    """(CSV, Markdown) of one benchmark's rows: score and details per m (with their standard
    errors, where the benchmark gives them), prefill GFLOPs and milliseconds; Markdown adds a
    table by question type where the benchmark has types."""
    rows = [flat_row(r) for r in results["rows"]]
    names = columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["benchmark"] + names)
    for r in rows:
        writer.writerow([results["benchmark"]] + [r.get(c, "") for c in names])
    shown = [c for c in names if not c.startswith(("stderr/", "by_type"))]
    base = flat_row(results.get("majority_baseline") or {})

    def cell(row: dict, name: str, errors: bool = True) -> str:
        if name == "tflops":  # shown in GFLOPs: a tiny model's prefill is a few
            return "" if row.get(name) is None else f"{1e3 * row[name]:.4g}"
        return with_error(row.get(name), row.get(f"stderr/{name}") if errors else None)

    cells = [[cell(r, c) for c in shown] for r in rows]
    if base:
        cells.append(["majority baseline"] + [cell(base, c, errors=False) for c in shown[1:]])
    header = ["GFLOPs" if c == "tflops" else c for c in shown]
    text = markdown_table(header, cells) + "\n"
    types = [k for k in results["rows"][0].get("by_type", {})] if results["rows"] else []
    if types:
        type_rows = [[t] + [with_error(r["by_type"].get(t), r["by_type_stderr"].get(t))
                            for r in results["rows"]]
                     + ([fmt(results["majority_baseline"]["by_type"].get(t))] if base else [])
                     for t in types]
        text += ("\nBy question type (exact match %, ± standard error):\n\n"
                 + markdown_table(["type"] + [f"m = {r['m']}" for r in results["rows"]]
                                  + (["majority"] if base else []), type_rows) + "\n")
    return buf.getvalue(), text


def write_sweep(results: dict, out_dir: Path) -> None:
    text_csv, text_md = sweep_tables(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "eval.json", json.dumps(results, indent=1))
    write_atomic(out_dir / "eval.csv", text_csv)
    about = "".join(f", {k} {results[k]}" for k in ("run", "step", "date") if k in results)
    write_atomic(out_dir / "eval.md", f"{results['benchmark']}: {results['questions']} questions"
                 f"{about}\n\n" + text_md)
    plot_sweep([results], out_dir / "eval.png")


def plot_sweep(all_results: list[dict], path: Path) -> None:
    """Score against m (log axis, ticks at the m evaluated), one line per benchmark with its
    standard errors as error bars; prefill GFLOPs per request on the right. PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    for results in all_results:
        rows = [r for r in results["rows"] if "score" in r]
        if rows:
            errors = [r.get("stderr", {}).get("score", 0.0) for r in rows]
            ax.errorbar([r["m"] for r in rows], [r["score"] for r in rows], yerr=errors, fmt="o-",
                        capsize=3, label=results["benchmark"])
    base = all_results[0].get("majority_baseline", {}).get("score") if len(all_results) == 1 else None
    if base is not None:
        ax.axhline(base, color="grey", ls=":", label="majority baseline")
    rows = all_results[0]["rows"]
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["m"] for r in rows], [str(r["m"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens m")
    ax.set_ylabel("score (%)")
    handles, labels = ax.get_legend_handles_labels()
    if all(r.get("tflops") is not None for r in rows):
        right = ax.twinx()
        line = right.plot([r["m"] for r in rows], [1e3 * r["tflops"] for r in rows], "s--",
                          color="tab:red", alpha=0.6, label="prefill GFLOPs / request")
        right.set_ylabel("prefill GFLOPs per request", color="tab:red")
        right.tick_params(axis="y", colors="tab:red")
        right.set_ylim(bottom=0)
        handles, labels = handles + line, labels + ["prefill GFLOPs / request"]
    ax.grid(alpha=0.3)
    # Below the axes, where it covers no data.
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    save_figure(fig, path)


def write_collection(root: Path) -> list[dict]:
    """root/sweep.csv, sweep.md and sweep.png: score per benchmark per m over every benchmark
    evaluated under root (root/<benchmark>/eval.json)."""
    all_results = [json.loads(p.read_text()) for p in sorted(root.glob("*/eval.json"))]
    if not all_results:
        return []
    shared = ["m", "score", "tflops", "prefill_ms"]  # detail columns differ by benchmark
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["benchmark"] + shared)
    for r in all_results:
        writer.writerows([r["benchmark"]] + [row.get(c, "") for c in shared] for row in r["rows"])
    write_atomic(root / "sweep.csv", buf.getvalue())
    write_atomic(root / "sweep.md", "\n".join(f"### {r['benchmark']}\n\n{sweep_tables(r)[1]}"
                                              for r in all_results))
    plot_sweep(all_results, root / "sweep.png")
    return all_results


def evaluate_run(run_: TrainedRun, out_root: Path, config: EvalConfig | None = None) -> dict:
    """Evaluate into out_root/<benchmark>/ and refresh out_root's sweep table and plot
    (process 0 writes and prints)."""
    config = config or run_.eval_config
    about = {"run": str(run_.path.absolute()), "step": run_.step,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "config": str(run_config_file(run_.path).absolute()), "eval_config": dataclasses.asdict(config)}
    with sharding.activate(run_.mesh):
        results = evaluate(run_.model_config, run_.params, config, run_.mesh,
                           out_root / config.benchmark, about)
    if jax.process_index() > 0:
        return results
    write_collection(out_root)
    print(f"{results['benchmark']} score (%) by m; written to {out_root / config.benchmark}\n"
          + sweep_tables(results)[1])
    return results
