"""mqt_jax: the Matryoshka Query Transformer in JAX/Flax. `mqt_jax.load(path)` opens a run
(see mqt_jax/inference/api.py); the package's modules import nothing heavy until used."""


def __getattr__(name):  # lazy: `import mqt_jax.cli` must not import jax first
    if name in ("load", "Model", "Answer"):
        from mqt_jax.inference import api

        return getattr(api, name)
    raise AttributeError(f"module 'mqt_jax' has no attribute {name!r}")
