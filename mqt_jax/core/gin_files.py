"""Gin files and bindings: where configs/ is, parsing with one-line errors, and a run's own
config.gin (with overrides in its stage's scope)."""

from __future__ import annotations

import contextlib
import logging
import sys
import tokenize
from pathlib import Path

import gin

# configs/ of a source checkout (editable install), else the copy setup.py installs.
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "configs",
                               Path(sys.prefix) / "share" / "mqt_jax" / "configs")
                   if (d / "tiny.gin").is_file()), Path(__file__).resolve().parents[2] / "configs")


def find_gin_file(name: str) -> str:
    """A path as given, else a file of the repository's configs/ folder."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.gin"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"gin file {name!r} not found (looked in . and {CONFIG_DIR})")


def parse_gin(files: list[str], params: list[str]) -> None:
    """Parse before importing anything heavy so that errors come first; gin's include
    statements resolve against configs/."""
    import mqt_jax.config  # noqa: F401  (registers every configurable)

    gin.clear_config()  # each command starts from its own files and bindings
    gin.add_config_file_search_path(str(CONFIG_DIR))
    # gin logs an ERROR for every search-path prefix an include is not under; it is not one.
    quiet = lambda record: not record.getMessage().startswith("Path not found")  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:
        for path in [find_gin_file(f) for f in files]:
            try:
                gin.parse_config_file(path)
            except SyntaxError as e:
                raise ValueError(f"gin syntax error in {e.filename or path}, line {e.lineno}: "
                                 f"{e.msg} {(e.text or '').strip()!r}") from None
            except tokenize.TokenError as e:  # an unclosed bracket
                raise ValueError(f"gin syntax error in {path}: {e.args[0]}") from None
            except RecursionError:  # gin follows includes without noticing a circle
                raise ValueError(f"gin file {path}: its includes go round in a circle (a file "
                                 f"that includes itself, directly or through others)") from None
        for binding in params:
            try:
                gin.parse_config(binding)
            except (SyntaxError, tokenize.TokenError) as e:
                raise ValueError(f"--gin_param {binding!r}: {getattr(e, 'msg', e.args[0])}") from None
        gin.finalize()
    finally:
        logging.getLogger().removeFilter(quiet)


def in_scope(binding: str, scope: str) -> str:
    """'A.b = v' as 'scope/A.b = v'; bindings already scoped, and macros, as they are."""
    key = binding.split("=", 1)[0].strip()
    return binding if not scope or "/" in key or "." not in key else f"{scope}/{binding.strip()}"


def scoped(stage: str):
    """The gin scope of a stage ("" : unscoped)."""
    return gin.config_scope(stage) if stage else contextlib.nullcontext()
