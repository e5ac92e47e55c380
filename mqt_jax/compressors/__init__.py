"""Compressors: patch features -> the visual tokens the LLM reads, one file each.

Each is a Flax module that also describes itself (base.Compressor's class attributes and
class methods); `get(name)` finds the one `QueryTransformerConfig.variant` names. A new
compressor is a file here that registers itself (imported below) plus its test.
"""

# Imported in the order their names are listed (errors, --help).
from mqt_jax.compressors import official, qformer, mlp2x_gelu, avgpool, victor, quecc, m3  # noqa: F401, I001
from mqt_jax.compressors.base import REGISTRY, Compressor, get, register  # noqa: F401


def build(config, **kwargs) -> Compressor:
    """The compressor module that `config.variant` names (a QueryTransformerConfig)."""
    return get(config.variant)(config, **kwargs)
