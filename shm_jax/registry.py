"""`make_memory(name, size=..., features=None, **kwargs)`: one place that maps names to memories."""

from __future__ import annotations

import functools

from shm_jax.baselines import GRU, LRU
from shm_jax.shm import SHM

_MEMORIES = {
    "shm": SHM,
    "shm_nocal": functools.partial(SHM, calibration="none"),
    "shm_fixed": functools.partial(SHM, calibration="fixed"),
    "shm_single": functools.partial(SHM, calibration="single_theta"),
    "gru": GRU,
    "lru": LRU,
}
memory_names: list[str] = sorted(_MEMORIES)


def make_memory(name: str, *, size: int, features: int | None = None, **kwargs):
    """A memory module by name (see `memory_names`); `size` is H for SHM, hidden units for the
    GRU, state size for the LRU; `features` is the output width (defaults to `size`); other
    keyword arguments go to the module (e.g. `method="chunked"`, `clamp=100.0` for SHM)."""
    if name not in _MEMORIES:
        raise ValueError(f"unknown memory {name!r}; choose one of {', '.join(memory_names)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"memory size must be a positive int; got {size!r}")
    return _MEMORIES[name](size=size, features=features, **kwargs)
