"""Deployment security: TLS, node keys, signing keys, signed checkpoints, trusted apps, proxy."""
