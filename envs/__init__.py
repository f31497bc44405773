"""Jitted, vmapped JAX environments with gymnax 1.0.1's API.

`envs.make(name, **kwargs) -> (env, params)` builds any registered id (see `envs.registered`)
or passes a gymnax id through to `gymnax.make`. Each env family lives in one module of this
package and exposes `REGISTRY: dict[str, Callable[..., Environment]]` (id -> zero-argument
factory; keyword arguments given to `make` are forwarded to it).
"""

from __future__ import annotations

import difflib
import importlib

from envs.core import VecEnv, VecEnvState

# One module per env family; each contributes its ids through a module-level REGISTRY dict.
_FAMILIES = (
    "repeat_first",
    "repeat_previous",
    "autoencode",
    "count_recall",
    "higher_lower",
    "concentration",
    "battleship",
    "minesweeper",
    "multiarmed_bandit",
    "cartpole",
    "pendulum",
    "credit_assign",
    "meta",
)


def _collect() -> dict:
    registry = {}
    for family in _FAMILIES:
        module = importlib.import_module(f"{__name__}.{family}")
        for env_id, factory in module.REGISTRY.items():
            if env_id in registry:
                raise RuntimeError(f"env id {env_id!r} is registered twice (again in {family})")
            registry[env_id] = factory
    return registry


REGISTRY = _collect()
registered: list[str] = sorted(REGISTRY)


def _gymnax_ids() -> list[str]:
    import gymnax

    return list(gymnax.registered_envs)


def make(name: str, **kwargs):
    """Build env `name` and its default params: `(env, params)`.

    `name` is a project id (`envs.registered`, popgym's class names such as
    `RepeatPreviousEasy`) or a gymnax id (`gymnax.registered_envs`, e.g. `MemoryChain-bsuite`).
    Keyword arguments go to the env's constructor. An unknown name raises a ValueError that
    lists the closest ids.
    """
    if name in REGISTRY:
        env = REGISTRY[name](**kwargs)
        return env, env.default_params
    gymnax_ids = _gymnax_ids()
    if name in gymnax_ids:
        import gymnax

        return gymnax.make(name, **kwargs)
    close = difflib.get_close_matches(name, registered + gymnax_ids, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown env id {name!r}.{hint} See envs.registered for this project's "
        f"{len(registered)} ids, or gymnax.registered_envs for gymnax's."
    )


__all__ = ["make", "registered", "REGISTRY", "VecEnv", "VecEnvState"]
