"""Stable Hadamard Memory (Le et al., ICLR 2025) in JAX: pure Hadamard scans, the SHM layer,
baseline memories with the same interface, and a registry."""

from shm_jax.baselines import GRU, LRU
from shm_jax.kernel import fused_read, pallas_read
from shm_jax.native import native_read
from shm_jax.registry import make_memory, memory_names
from shm_jax.scan import hadamard_read, hadamard_scan
from shm_jax.shm import SHM

__all__ = [
    "GRU",
    "LRU",
    "SHM",
    "fused_read",
    "hadamard_read",
    "hadamard_scan",
    "make_memory",
    "memory_names",
    "native_read",
    "pallas_read",
]
