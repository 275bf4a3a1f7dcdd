"""LLaMA-Factory: prepared data as LLaMA-Factory datasets (`export`)."""
