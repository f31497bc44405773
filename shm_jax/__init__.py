"""Stable Hadamard Memory (Le et al., ICLR 2025) in JAX: pure Hadamard scans, the SHM layer,
baseline memories with the same interface, and a registry."""

from shm_jax.attention import Attention
from shm_jax.baselines import GRU, LRU
from shm_jax.cell import SHMCell
from shm_jax.ffm import FFM
from shm_jax.fwp import FWP
from shm_jax.kernel import fused_read, pallas_read
from shm_jax.mlstm import MLSTM
from shm_jax.native import native_read
from shm_jax.registry import make_memory, memory_names
from shm_jax.s6 import S6
from shm_jax.scan import hadamard_read, hadamard_scan
from shm_jax.shm import SHM

__all__ = [
    "Attention",
    "FFM",
    "FWP",
    "GRU",
    "LRU",
    "MLSTM",
    "S6",
    "SHM",
    "SHMCell",
    "fused_read",
    "hadamard_read",
    "hadamard_scan",
    "make_memory",
    "memory_names",
    "native_read",
    "pallas_read",
]
