"""`make_memory(name, size=..., features=None, **kwargs)`: one place that maps names to memories."""

from __future__ import annotations

import functools

from shm_jax.attention import Attention
from shm_jax.baselines import GRU, LRU
from shm_jax.ffm import FFM
from shm_jax.fwp import FWP
from shm_jax.mlstm import MLSTM
from shm_jax.s6 import S6
from shm_jax.shm import SHM

_MEMORIES = {
    "shm": SHM,
    "shm_nocal": functools.partial(SHM, calibration="none"),
    "shm_fixed": functools.partial(SHM, calibration="fixed"),
    "shm_single": functools.partial(SHM, calibration="single_theta"),
    "gru": GRU,
    "lru": LRU,
    "ffm": FFM,
    "mlstm": MLSTM,
    "s6": S6,
    "fwp": FWP,
    "attention": Attention,
}
memory_names: list[str] = sorted(_MEMORIES)


def make_memory(name: str, *, size: int, features: int | None = None, **kwargs):
    """A memory module by name (see `memory_names`). `size` is, per memory:

    - shm, shm_*: H, the memory is H × H.
    - gru: hidden units.
    - lru: N, the complex state size.
    - ffm: m, the input width; the state is m × c complex (c = `context`, 4).
    - mlstm: the hidden width heads · d; each head's matrix memory is d × d (1 head by default).
    - s6: D, the inner channel width; the state is D × N (N = `state_size`, 16) plus the conv's
      last 3 inputs per channel with the Mamba block.
    - fwp: H, the fast weights are H × H.
    - attention: D, the model width; the KV cache holds `window` (64) steps of D-wide keys and
      values.

    `features` is the output width (defaults to `size`); other keyword arguments go to the module
    (e.g. `method="chunked"`, `clamp=100.0` for SHM, `block=False` for S6)."""
    if name not in _MEMORIES:
        raise ValueError(f"unknown memory {name!r}; choose one of {', '.join(memory_names)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"memory size must be a positive int; got {size!r}")
    return _MEMORIES[name](size=size, features=features, **kwargs)
