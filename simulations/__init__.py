"""Simulations: partitions, scenarios, the `leanfed` CLI and benchmarks."""
