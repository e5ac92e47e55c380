"""The lowest layer above config: device mesh and sharding rules, the nested-prefix splice of
visual tokens, FLOPs, orbax checkpoints, Hugging Face safetensors folders, gin files, and
atomic output files. Imports only mqt_jax.config."""
