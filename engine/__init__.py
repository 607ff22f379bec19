"""Adaptive Inference Explorer engine: models, traces, policies and runtimes (no UI code)."""
