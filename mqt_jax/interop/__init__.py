"""Interop: Hugging Face / MQT-LLaVA / M3 checkpoints in (convert) and out (export)."""
