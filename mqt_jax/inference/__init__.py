"""Inference: batched generation with m per row (generate), the continuous-batching engine
(engine), the policies that choose m per query when answering (policy), and the Python API
(`mqt_jax.load`, api). Imports nothing of training."""
