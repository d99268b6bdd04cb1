"""Continual learning: drift-triggered regrowth, weight protection, replay, CL metrics."""
