"""Secure-aggregation maths (SecAgg+, Bell et al. 2020): keys, shares, masks, quantization."""
