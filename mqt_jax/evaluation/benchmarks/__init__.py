"""Evaluation benchmarks, one file each: its question format, official scoring and submission
files (`base.Benchmark`). A new benchmark is a file here whose class carries `@register`,
plus its test: every module of this folder is imported below, so nothing else changes.
"""

import importlib
import pkgutil

from mqt_jax.evaluation.benchmarks.base import (
    BENCHMARKS,
    SHORT_ANSWER,
    Benchmark,
    Question,
    get,
    llava_answers,
    register,
    stderr,
)

__all__ = ["BENCHMARKS", "SHORT_ANSWER", "Benchmark", "Question", "get", "llava_answers",
           "register", "stderr"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
