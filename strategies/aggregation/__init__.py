"""Sparse aggregation: pure merge rules and Flower strategy classes."""
