"""The research loop for the default recipe: train one variant, score it on the VALIDATION
split, print accuracy per question type per m (± standard error) beside the majority answer
and the share of answers of the question's kind, and log the row.

    python scripts/recipe_loop.py --name lr3e-4 --gin_param "stage2/TrainConfig.learning_rate=3e-4"

Runs `mqt-jax train` (configs/tiny_two_stage.gin unless --gin_file says otherwise) in --root
(default "."): its data/shapes and data/shapes/pretrained (stage 0) are generated once and
cached there, so a variant costs stage 1 + stage 2 + evaluation (about 10 minutes on 2 CPU
cores). A variant that changes the data (ShapesConfig bindings) needs a --root of its own.
The run goes to ROOT/research/NAME. Every variant's row is appended to ROOT/research/log.md:
name, bindings, accuracy per m, wall time.

"Of its kind" is the share of answers that are one of the answers the type's references
use (a number for "how many", a colour for "what colour"): below 100% the model answers
something other than what the question asks, i.e. it does not read the question.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mqt_jax.core.outputs import markdown_table
from mqt_jax.evaluation.benchmarks.base import shapes_normalize, stderr

VAL = ('EvalConfig.questions = "data/shapes/val/questions.jsonl"',
       'EvalConfig.answers = "data/shapes/val/answers.jsonl"')


def per_type(eval_dir: Path, answers_file: Path) -> tuple[list[int], dict, dict]:
    """m values, {type: {m: (accuracy %, stderr, of-its-kind %)}}, {type: (majority %, n)}."""
    refs = {r["question_id"]: r for r in map(json.loads, answers_file.read_text().splitlines())}
    kinds = defaultdict(set)
    for r in refs.values():
        kinds[r["type"]].add(shapes_normalize(r["answer"]))
    m_values = sorted(int(p.stem.removeprefix("answers_m")) for p in eval_dir.glob("answers_m*.jsonl"))
    table = defaultdict(dict)
    for m in m_values:
        rows = [json.loads(line) for line in (eval_dir / f"answers_m{m}.jsonl").read_text().splitlines()]
        by_type = defaultdict(lambda: ([], []))
        for row in rows:
            ref = refs[row["question_id"]]
            said = shapes_normalize(row["text"])
            right, of_kind = by_type[ref["type"]]
            right.append(said == shapes_normalize(ref["answer"]))
            of_kind.append(said in kinds[ref["type"]])
        for t, (right, of_kind) in by_type.items():
            table[t][m] = (100 * np.mean(right), stderr(right), 100 * np.mean(of_kind))
    majority = {}
    for t in kinds:
        answers = [shapes_normalize(r["answer"]) for r in refs.values() if r["type"] == t]
        top = max(set(answers), key=answers.count)
        majority[t] = (100 * answers.count(top) / len(answers), len(answers))
    return m_values, dict(table), majority


def print_tables(eval_dir: Path, answers_file: Path) -> str:
    m_values, table, majority = per_type(eval_dir, answers_file)
    rows = [[t] + [f"{table[t][m][0]:.1f} ± {table[t][m][1]:.1f} ({table[t][m][2]:.0f})"
                   for m in m_values] + [f"{majority[t][0]:.1f}"] for t in table]
    overall = json.loads((eval_dir / "eval.json").read_text())
    by_m = {r["m"]: r for r in overall["rows"]}
    rows.append(["all"] + [f"{by_m[m]['score']:.1f} ± {by_m[m]['stderr']['score']:.1f}"
                           for m in m_values] + [f"{overall['majority_baseline']['score']:.1f}"])
    text = markdown_table(["type (of its kind %)"] + [f"m = {m}" for m in m_values] + ["majority"], rows)
    print(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the variant: ROOT/research/NAME")
    parser.add_argument("--root", default=".", help="where data/shapes (and its stage 0) live")
    parser.add_argument("--gin_file", default="tiny_two_stage.gin")
    parser.add_argument("--gin_param", action="append", default=[], help="a binding (repeatable)")
    parser.add_argument("--m", default="1,2,4,8,16,36,64", help="the m values to score")
    parser.add_argument("--note", default="", help="a word on the variant for the log")
    args = parser.parse_args()
    if not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        sys.exit(f"--name {args.name!r}: letters, digits, '-', '_' and '.' only (it names a folder)")
    root = Path(args.root).resolve()
    if not root.is_dir():
        sys.exit(f"--root {args.root}: not a folder")
    workdir = Path("research") / args.name
    bindings = list(VAL) + [f"EvalConfig.m_values = ({args.m},)"] + args.gin_param
    command = ["mqt-jax", "train", "--gin_file", args.gin_file, "--workdir", str(workdir)]
    for b in bindings:
        command += ["--gin_param", b]
    print("+", shlex.join(command), flush=True)
    start = time.time()
    if subprocess.run(command, cwd=root).returncode:
        sys.exit(f"{args.name}: mqt-jax train failed (its output above says why)")
    minutes = (time.time() - start) / 60
    eval_dir = root / workdir / "eval" / "shapes"
    text = print_tables(eval_dir, root / "data/shapes/val/answers.jsonl")
    log = root / "research" / "log.md"
    with log.open("a") as f:
        f.write(f"\n## {args.name} ({minutes:.1f} min)\n\n{args.note}\n\n"
                f"`{' '.join(args.gin_param) or '(the default)'}`\n\n{text}\n")
    print(f"{minutes:.1f} min; logged in {log}")


if __name__ == "__main__":
    main()
