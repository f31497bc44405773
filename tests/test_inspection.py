"""train.py's inspection section: `replay_episode` records consistent episodes (resets, lengths,
returns, held-out tasks) and `memory_trace` gives the SHM layer's recurrence on the network's own
memory inputs (against the layer fed those inputs by hand, and chunked against whole)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train

TINY = train.Config(
    env="RepeatFirstEasy",
    memory_size=4,
    hidden=8,
    time_embedding=4,
    num_envs=2,
    num_steps=8,
    num_minibatches=1,
)


def init_params(cfg):
    setup = train.make_env_and_network(cfg)
    carry = setup.network.initialize_carry((1,))
    obs = jnp.zeros((1, 1, setup.venv.obs_dim))
    aux = setup.memory.sample_aux(jax.random.key(0), (1, 1))
    params = setup.network.init(jax.random.key(1), carry, obs, jnp.ones((1, 1), bool), aux)
    return setup, params


@pytest.fixture(scope="module")
def replay():
    setup, params = init_params(TINY)
    episode = train.replay_episode(TINY, setup, params, jax.random.key(2), num_episodes=3)
    return setup, params, episode


def test_replay_records_consecutive_episodes(replay):
    setup, _, ep = replay
    T = len(ep["reset"])
    assert ep["obs"].shape == (T, setup.venv.obs_dim) and ep["aux"].shape == (T,)
    assert ep["reset"][0] and ep["done"][-1]
    # an episode starts right after one ends, and only then
    np.testing.assert_array_equal(ep["reset"][1:], ep["done"][:-1])
    assert ep["done"].sum() == 3 and ep["episode"][-1] == 2
    lengths = np.bincount(ep["episode"])
    returns = np.bincount(ep["episode"], weights=ep["reward"])
    np.testing.assert_array_equal(ep["episode_length"], lengths)
    np.testing.assert_allclose(ep["episode_return"], returns, rtol=1e-6)
    assert jax.tree.leaves(ep["state"])[0].shape[0] == T


def test_memory_trace_is_the_layer_on_the_networks_inputs(replay):
    setup, params, ep = replay
    trace = train.memory_trace(setup, params, ep)
    T, H = len(ep["reset"]), TINY.memory_size
    assert trace["M"].shape == trace["C"].shape == trace["U"].shape == (T, H, H)
    # by hand: the embedding layer's output is the memory's input (ActorCritic)
    seq = [jnp.asarray(ep[k])[:, None] for k in ("obs", "reset", "aux")]
    carry0 = setup.network.initialize_carry((1,))
    out, inter = setup.network.apply(
        params, carry0, *seq, capture_intermediates=True, mutable=["intermediates"]
    )
    M_last = out[0][0]  # the network's carry is (memory carry, step index)
    x = jax.nn.relu(inter["intermediates"]["embed"]["__call__"][0])
    mem_params = {"params": params["params"]["memory"]}
    ref = setup.memory.apply(
        mem_params, setup.memory.initialize_carry((1,)), x, *seq[1:], method="memory_trace"
    )
    for k in ("M", "C", "U"):
        np.testing.assert_allclose(trace[k], np.asarray(ref[k][:, 0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trace["M"][-1], np.asarray(M_last[0]), rtol=1e-5, atol=1e-6)
    # zeroed at each episode's start: M_t = U_t there
    starts = np.flatnonzero(ep["reset"])
    np.testing.assert_allclose(trace["M"][starts], trace["U"][starts], rtol=1e-6, atol=1e-7)
    # chunks carrying the network carry give the same numbers as one call
    fn, carry, parts, cut = train.make_memory_trace(setup), carry0, [], T // 3
    for a, b in ((0, cut), (cut, T)):
        carry, out = fn(params, carry, *(s[a:b] for s in seq))
        parts.append(np.asarray(out["M"][:, 0]))
    np.testing.assert_allclose(np.concatenate(parts), trace["M"], rtol=1e-5, atol=1e-6)
    # method="vectors": the layer's per-step vectors on the same inputs
    _, vec = train.make_memory_trace(setup, method="vectors")(params, carry0, *seq)
    ref = setup.memory.apply(
        mem_params, setup.memory.initialize_carry((1,)), x, *seq[1:], method="vectors"
    )
    assert vec["k"].shape == (T, 1, H)
    for k in ("x_hat", "k", "q", "theta"):
        np.testing.assert_allclose(vec[k], ref[k], rtol=1e-5, atol=1e-6)


def test_memory_trace_needs_shm_and_held_out_needs_meta(replay):
    cfg = dataclasses.replace(TINY, memory="gru")
    setup, params = init_params(cfg)
    with pytest.raises(ValueError, match="SHM layer.*GRU"):
        train.memory_trace(setup, params, replay[2])
    with pytest.raises(ValueError, match="held_out=True needs a meta-RL env"):
        train.replay_episode(cfg, setup, params, jax.random.key(0), held_out=True)


def test_replay_held_out_tasks_greedy_continuous():
    cfg = dataclasses.replace(TINY, env="Wind-10-190")
    setup, params = init_params(cfg)
    ep = train.replay_episode(cfg, setup, params, jax.random.key(3), held_out=True, greedy=True)
    assert ep["action"].shape == (100, 2) and np.all(np.abs(ep["action"]) <= 1)
    assert np.all(ep["state"].task_index >= setup.env.num_train_tasks)
    np.testing.assert_allclose(ep["obs"][:, :2], ep["state"].pos, atol=1e-6)
    assert ep["episode_return"].shape == ep["episode_return_ep0"].shape == (1,)
