"""Settings for the whole test session, so that its exact comparisons hold on a GPU as on a CPU
(docs/performance.md, "On a GPU: precision and determinism"): XLA's deterministic GPU ops (set here, before any test module imports
gymnax, which starts jax's backend; subprocesses inherit it), and float32 matmuls in full float32
(a GPU's default rounds their inputs to TF32). A CPU's results are the same either way."""

import jax

import launch

launch.deterministic_gpu_ops()
jax.config.update("jax_default_matmul_precision", "highest")
