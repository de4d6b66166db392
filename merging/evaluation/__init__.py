"""Measuring encoders: backbones, the task registry, datasets, zero-shot heads and the evaluator."""
