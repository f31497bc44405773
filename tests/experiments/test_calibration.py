"""experiments.calibration: the log-space cumulative-product statistics against a float64 numpy
direct product (zeros and negative entries included), and `cumprod` end to end on hand-made run
directories (chunked = whole, C ≡ 1 for shm_nocal, csv round trip, GRU refused)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import run
import train
from experiments import calibration


def direct_stats(C):
    """log10 of the Frobenius norm, largest and smallest |entry| of the direct product."""
    P = np.abs(np.cumprod(np.asarray(C, np.float64), axis=0)).reshape(len(C), -1)
    with np.errstate(divide="ignore"):
        return {
            "log10_norm": np.log10(np.linalg.norm(P, axis=1)),
            "log10_max": np.log10(P.max(1)),
            "log10_min": np.log10(P.min(1)),
        }


def test_log_cumprod_stats_match_the_direct_product():
    rng = np.random.default_rng(0)
    C = rng.uniform(0.0, 2.0, (60, 3, 3))
    C[::7, 0, 1] *= -1  # |C| is what counts
    C[20, 2, 2] = 0.0  # that entry of P is 0 from step 20 on: its log is -inf
    stats = calibration.cumprod_stats(calibration.log_cumprod(C))
    ref = direct_stats(C)
    for k in ref:
        np.testing.assert_allclose(stats[k], ref[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert np.isneginf(stats["log10_min"][20:]).all() and np.isfinite(stats["log10_min"][:20]).all()
    # chunks chained through `start` give the whole sequence's numbers
    first = calibration.log_cumprod(C[:25])
    np.testing.assert_allclose(
        np.concatenate([first, calibration.log_cumprod(C[25:], first[-1])]),
        calibration.log_cumprod(C),
        rtol=1e-12,
    )
    # an all-zero P has norm 0 (-inf), without NaN
    zero = calibration.cumprod_stats(calibration.log_cumprod(np.zeros((2, 2, 2))))
    assert np.isneginf(zero["log10_norm"]).all()
    # far beyond float64: 5000 steps of C = 2 give log10 ‖P‖ = 5000 log10 2 + log10 3
    big = calibration.cumprod_stats(calibration.log_cumprod(np.full((5000, 3, 3), 2.0)))
    np.testing.assert_allclose(big["log10_norm"][-1], 5000 * np.log10(2) + np.log10(3))
    assert list(calibration.keep_steps(25, 10)) == [0, 10, 20, 24]


TINY = train.Config(
    env="RepeatFirstEasy",
    memory_size=4,
    hidden=8,
    time_embedding=4,
    num_envs=2,
    num_steps=8,
    num_minibatches=1,
    num_seeds=2,
)


def make_run_dir(path, **changes):
    """A run directory as run.py leaves it (config.json, params.msgpack with a seed axis), with
    freshly initialised params: what `cumprod` reads, without training."""
    cfg = dataclasses.replace(TINY, out=str(path), **changes)
    setup = train.make_env_and_network(cfg)
    carry = setup.network.initialize_carry((1,))
    obs = jnp.zeros((1, 1, setup.venv.obs_dim))
    aux = setup.memory.sample_aux(jax.random.key(0), (1, 1))

    def init(key):
        return setup.network.init(key, carry, obs, jnp.ones((1, 1), bool), aux)

    params = jax.vmap(init)(jax.random.split(jax.random.key(1), cfg.num_seeds))
    run.start_run_dir(cfg)
    with open(os.path.join(cfg.out, "params.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(params)))
    return cfg, setup, params


def test_cumprod_run_chunked_equals_direct(tmp_path, monkeypatch):
    cfg, setup, params = make_run_dir(tmp_path / "shm")
    monkeypatch.setattr(calibration, "CHUNK", 16)  # several chunks, the last one padded
    out = calibration.cumprod_run(cfg.out, episodes=3, every=5, seed=7)
    for s in range(cfg.num_seeds):
        p = train.one_seed(params, s)
        ep = train.replay_episode(cfg, setup, p, jax.random.key(7 + s), num_episodes=3)
        T = len(ep["reset"])
        assert T > 2 * 16 and ep["done"].sum() == 3
        ref = direct_stats(train.memory_trace(setup, p, ep)["C"])
        rows = out["seed"] == s
        np.testing.assert_array_equal(out["t"][rows], calibration.keep_steps(T, 5))
        for k in ref:
            np.testing.assert_allclose(out[k][rows], ref[k][out["t"][rows]], rtol=1e-5, atol=1e-5)


def test_cli_writes_csvs_nocal_is_flat_gru_refused(tmp_path, capsys):
    shm_nocal, *_ = make_run_dir(tmp_path / "shm_nocal", memory="shm_nocal", num_seeds=1)
    gru, *_ = make_run_dir(tmp_path / "gru", memory="gru", num_seeds=1)
    out = tmp_path / "cumprod"
    calibration.main(["cumprod", shm_nocal.out, "--episodes", "2", "--out", str(out)])
    found = calibration.load_cumprod(str(out))
    assert list(found) == [("RepeatFirstEasy", "shm_nocal")]
    nocal = found["RepeatFirstEasy", "shm_nocal"]
    np.testing.assert_allclose(nocal["log10_norm"], np.log10(TINY.memory_size), rtol=1e-6)
    np.testing.assert_allclose(nocal["log10_max"], 0.0, atol=1e-7)
    with pytest.raises(SystemExit) as stop:
        calibration.main(["cumprod", gru.out, "--out", str(out)])
    assert stop.value.code == 2
    assert "SHM layer" in capsys.readouterr().err
    assert calibration.load_cumprod(str(tmp_path / "missing")) == {}
    twin, *_ = make_run_dir(tmp_path / "elsewhere" / "shm_nocal", memory="shm_nocal", num_seeds=1)
    with pytest.raises(SystemExit):  # two runs named alike would write one csv
        calibration.main(["cumprod", shm_nocal.out, twin.out, "--out", str(out)])
    assert "same name" in capsys.readouterr().err
    assert json.load(open(os.path.join(shm_nocal.out, "config.json")))["memory"] == "shm_nocal"
