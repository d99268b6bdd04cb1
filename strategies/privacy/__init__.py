"""Differential privacy of sparse updates: DP-SGD, client-level clipping + noise, accounting."""
