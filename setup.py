from glob import glob

from setuptools import find_packages, setup

setup(
    name="mqt_jax",
    version="0.1.0",
    description="Matryoshka Query Transformer (MQT-LLaVA) in JAX/Flax: every m in one sharded XLA graph",
    packages=find_packages(include=["mqt_jax", "mqt_jax.*"]),
    # configs/ for installs that are not editable (the CLI looks in <prefix>/share/mqt_jax)
    data_files=[("share/mqt_jax/configs", glob("configs/*.gin")),
                ("share/mqt_jax/configs/sweeps", glob("configs/sweeps/*.gin"))],
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "einops>=0.8",
        "gin-config>=0.5",
        "numpy",
        "ml_dtypes",  # bfloat16 arrays on the host (safetensors in and out); comes with jax
        "tqdm",
        "matplotlib",
        "tensorboardX",
        "pillow",
        "sentencepiece",
        "tokenizers",
        "safetensors",  # validates safetensors headers (hf.py reads the tensors itself)
        "scipy",  # the scaling-law fit (curve_fit)
        "etils[epath]",
        "tensorflow-datasets",  # local ArrayRecord builders only; never TensorFlow itself
        "importlib_resources",  # imported by tensorflow-datasets without being declared
        # mqt-jax serve: the HTTP stack (no hand-written HTTP) and its metrics
        "fastapi",
        "uvicorn",
        "pydantic>=2",
        "prometheus_client",
    ],
    extras_require={
        # tests run in parallel (-n 2); the server is tested with the official openai client
        "test": ["pytest>=8", "pytest-xdist>=3", "openai", "httpx"],
        # libtpu: TPU runs, and `mqt-jax aot` on any host (TPU topologies without a TPU).
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["mqt-jax=mqt_jax.cli:main"]},
)
