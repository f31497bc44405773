"""`SHMCell`: the SHM layer as a flax recurrent cell, one step at a time, for code built on
`nn.RNN` or PureJaxRL's `ScannedRNN`.

    cell = SHMCell(size=32)
    # a fresh θ row per step, and the rows drawn kept as intermediates
    rnn = nn.RNN(cell, split_rngs={"params": False, "aux": True}, variable_axes={"intermediates": 1})
    params = rnn.init({"params": key, "aux": key}, x)  # x [B, T, d], batch-major
    y, state = rnn.apply(params, x, rngs={"aux": key}, mutable="intermediates")
    aux = state["intermediates"]["cell"]["aux"][0]  # [B, T]

Inside `nn.scan` (PureJaxRL's `ScannedRNN`), pass `(x, aux, reset)` per step instead: the θ rows
come from `sample_aux` and are kept, so the PPO update can replay exactly what the agent acted
with, and `reset` zeroes the memory at an episode's start. Same parameters, same numbers as
`SHM`'s sequence form (tests/shm_jax/test_cell.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax.shm import SHM


class SHMCell(SHM, nn.RNNCellBase):
    """One step of Stable Hadamard Memory: `__call__(M [*batch, H, H], inputs) -> (M, y)`.

    `inputs` is x [*batch, d] alone (what `nn.RNN` passes), or `(x, aux)` or `(x, aux, reset)`:
    aux [*batch] int32, the θ row indices from `sample_aux`; reset [*batch] bool, which zeroes
    M before this step, as an episode start does in `SHM`. With x alone and calibration "shm",
    the θ rows are drawn from the "aux" rng stream and sown as the intermediate "aux" (under
    `nn.RNN`, split that stream over steps, `split_rngs={"params": False, "aux": True}`, and
    keep the rows with `variable_axes={"intermediates": time_axis}`).
    The fields are `SHM`'s; the step runs the layer's sequential form ("auto" picks it for one
    step), so it agrees with the layer's every form to float32 rounding.
    """

    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        """Zero memory M [*batch, H, H] for inputs of shape [*batch, d] (flax's cell API)."""
        del rng
        return jnp.zeros((*input_shape[:-1], self.size, self.size), self.dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1

    def __call__(self, carry, inputs):
        if isinstance(inputs, tuple | list):
            x, aux, *reset = inputs
        else:
            x, aux, reset = inputs, None, []
        if x.ndim < 2 or carry.shape != (*x.shape[:-1], self.size, self.size):
            raise ValueError(
                f"SHMCell takes one step: x [*batch, d] and M [*batch, {self.size}, {self.size}]; "
                f"got x {x.shape} and M {carry.shape}"
            )
        if aux is None and self.calibration == "shm":
            aux = self.sample_aux(self.make_rng("aux"), x.shape[:-1])
            self.sow("intermediates", "aux", aux)
        resets = reset[0][None] if reset else None
        carry, y = SHM.__call__(self, carry, x[None], resets, None if aux is None else aux[None])
        return carry, y[0]
