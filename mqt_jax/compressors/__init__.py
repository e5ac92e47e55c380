"""Compressors: patch features -> the visual tokens the LLM reads, one file each.

Each is a Flax module that also describes itself (base.Compressor's class attributes and
class methods); `get(name)` finds the one `QueryTransformerConfig.variant` names. A new
compressor is a file here that registers itself plus its test: every module of this folder
is imported below, so nothing else changes.
"""

import importlib
import pkgutil

from mqt_jax.compressors.base import REGISTRY, Compressor, check, get, register

__all__ = ["REGISTRY", "Compressor", "build", "check", "get", "register"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def build(config, **kwargs) -> Compressor:
    """The compressor module that `config.variant` names (a QueryTransformerConfig)."""
    return get(config.variant)(config, **kwargs)
