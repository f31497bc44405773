"""Stable Hadamard Memory in JAX (placeholder while the core is written)."""
