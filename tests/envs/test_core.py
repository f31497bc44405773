"""VecEnv: the batched auto-reset gives independent fresh episodes with gymnax `step`'s
distribution, episode statistics equal a manual accumulation, episode metrics and the previous
action reach the observation / info, and it runs under jit + vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import envs

N = 64


def rollout(venv, steps, key):
    obs, state = venv.reset(key)

    def body(state, k):
        ka, ks = jax.random.split(k)
        action = jax.vmap(venv.action_space.sample)(jax.random.split(ka, venv.num_envs))
        obs, state, reward, done, info = venv.step(ks, state, action)
        return state, (obs, state, action, reward, done, info)

    return jax.jit(lambda s, k: jax.lax.scan(body, s, jax.random.split(k, steps)))(state, key)


@pytest.fixture(scope="module")
def minesweeper():
    env, params = envs.make("MineSweeperEasy")  # random episode lengths: few envs end together
    venv = envs.VecEnv(env, params, N)
    return venv, rollout(venv, 60, jax.random.PRNGKey(0))[1]


def test_statistics_equal_manual_accumulation(minesweeper):
    _, (_, _, _, reward, done, info) = minesweeper
    reward, done = np.asarray(reward), np.asarray(done)
    ret = np.zeros(N)
    length = np.zeros(N, int)
    for t in range(reward.shape[0]):
        ret += reward[t]
        length += 1
        for i in np.flatnonzero(done[t]):
            assert abs(info["returned_episode_returns"][t, i] - ret[i]) < 1e-5
            assert info["returned_episode_lengths"][t, i] == length[i]
        ret[done[t]] = 0
        length[done[t]] = 0
    assert done.sum() > 3 * N  # many episodes ended, at many different steps
    assert np.asarray(info["returned_episode"]).sum() == done.sum()
    assert "returned_episode_success" in info  # MineSweeper's episode_metrics


def test_every_reset_is_fresh_and_independent():
    """Fixed-length card games end all together (the full-reset branch); boards of MineSweeper
    end a few at a time (the k-resets branch). Either way no two resets share a deck/board."""
    for env_id, steps in (("RepeatFirstEasy", 102), ("MineSweeperEasy", 40)):
        env, params = envs.make(env_id)
        venv = envs.VecEnv(env, params, N, num_resets=4)
        _, (_, state, _, _, done, _) = rollout(venv, steps, jax.random.PRNGKey(1))
        leaf = state.env_state.dealt if env_id.startswith("Repeat") else state.env_state.mines
        leaf, done = np.asarray(leaf), np.asarray(done)
        fresh = [tuple(leaf[t, i].ravel()) for t, i in zip(*np.nonzero(done), strict=True)]
        assert len(fresh) > N
        if env_id.startswith("Repeat"):
            # same-step resets never share a deck (MineSweeperEasy has only 120 layouts, so
            # repeats there are expected and only the count above is checked)
            for t in np.flatnonzero(done.any(1)):
                rows = [tuple(leaf[t, i].ravel()) for i in np.flatnonzero(done[t])]
                assert len(set(rows)) == len(rows)
            assert len(set(fresh)) == len(fresh)


def test_episodes_have_gymnax_step_distribution():
    """First observed card after an auto-reset: uniform over suits, as through gymnax `step`."""
    env, params = envs.make("RepeatFirstEasy")
    venv = envs.VecEnv(env, params, N, num_resets=8)
    _, (obs, _, _, _, done, _) = rollout(venv, 51 * 6, jax.random.PRNGKey(2))
    obs, done = np.asarray(obs), np.asarray(done)
    first_suits = obs[done].argmax(-1)  # obs returned at a done step is the next episode's first
    counts = np.bincount(first_suits, minlength=4)

    def gymnax_first(key):
        def body(state, k):
            obs, state, _, term, trunc, _ = env.step(k, state, 0, params)
            return state, (obs, term | trunc)

        _, state = env.reset(key, params)
        return jax.lax.scan(body, state, jax.random.split(key, 51 * 6))[1]

    g_obs, g_done = jax.jit(jax.vmap(gymnax_first))(jax.random.split(jax.random.PRNGKey(3), N))
    g_counts = np.bincount(np.asarray(g_obs)[np.asarray(g_done)].argmax(-1), minlength=4)
    assert counts.sum() == g_counts.sum() == 6 * N
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([counts, g_counts])).pvalue > 1e-3


def test_previous_action_and_first_flag():
    env, params = envs.make("RepeatFirstEasy")
    venv = envs.VecEnv(env, params, 4, prev_action=True)
    assert venv.obs_dim == 4 + 4 + 1
    obs0, _ = venv.reset(jax.random.PRNGKey(0))
    assert np.all(np.asarray(obs0[:, 4:8]) == 0) and np.all(np.asarray(obs0[:, 8]) == 1)
    _, (obs, _, action, _, done, _) = rollout(venv, 60, jax.random.PRNGKey(4))
    obs, action, done = np.asarray(obs), np.asarray(action), np.asarray(done)
    for t in range(60):
        for i in range(4):
            if done[t, i]:
                assert np.all(obs[t, i, 4:8] == 0) and obs[t, i, 8] == 1
            else:
                assert obs[t, i, 4 + action[t, i]] == 1 and obs[t, i, 8] == 0
    # the env's own part is the card just dealt (suit one-hot)
    assert np.all(obs[:, :, :4].sum(-1) == 1)


def test_gymnax_env_and_vmap_over_seeds():
    env, params = envs.make("MemoryChain-bsuite")
    venv = envs.VecEnv(env, params, 8)
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    step = jax.jit(jax.vmap(lambda k: rollout(venv, 30, k)[1][3].sum()))
    rewards = np.asarray(step(keys))
    assert rewards.shape == (2,)
    obs, _ = venv.reset(keys[0])
    assert obs.shape == (8, venv.obs_dim) and obs.dtype == jnp.float32


def test_bad_arguments():
    env, params = envs.make("RepeatFirstEasy")
    with pytest.raises(ValueError, match="num_envs must be a positive int"):
        envs.VecEnv(env, params, 0)
    with pytest.raises(ValueError, match="num_resets must be in"):
        envs.VecEnv(env, params, 4, num_resets=9)
