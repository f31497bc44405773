"""Visual Match and Key-to-Door against the original pycolab games and scripted policies.

The strongest test (`test_matches_original_pycolab_*`) runs the SHM authors' original game files
(thaihungle/SHM `pomdp-baselines/envs/credit_assign/key_to_door/*.py`, read from a local git
mirror, never copied into this repo) under pycolab 1.2 and compares observations, rewards,
done flags and success step by step on the same layouts and actions. It skips when the mirror
(env var SHM_GIT_DIR, default /work/.mirror/thaihungle+SHM/repo) or pycolab is missing.
"""

from __future__ import annotations

import collections
import collections.abc
import importlib
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import credit_assign as ca

D_TEST = 30  # a short distractor for the step-by-step tests (apples respawn after 21 frames)

# ---------------------------------------------------------------------------------------------
# Scripted policies (oracles on the env state), one jitted rollout per env.


def vm_policy(env, state, mode):
    """mode 0: the target's door; 1: the next door (wrong)."""
    return env.oracle_action(state, env.default_params, right=mode == 0)


def ktd_policy(env, state, mode):
    """mode 0: fetch the key; 1: never touch it."""
    return env.oracle_action(state, env.default_params, take_key=mode == 0)


def make_rollout(env, policy):
    """jit(vmap) rollout of one whole episode: keys [B], mode [B] -> rewards, dones, success,
    obs [B, T + 1, 75], and the env state after reset."""
    params = env.default_params

    def one(key, mode):
        obs0, state0 = env.reset_env(key, params)

        def body(state, _):
            action = policy(env, state, mode)
            obs, state, reward, done, info = env.step_env(key, state, action, params)
            return state, (obs, reward, done, info["success"])

        _, (obs, rewards, dones, success) = jax.lax.scan(body, state0, None, env.episode_len)
        return jnp.concatenate([obs0[None], obs]), rewards, dones, success, state0

    return jax.jit(jax.vmap(one))


@pytest.fixture(scope="module")
def vm_runs():
    env = ca.VisualMatch(distractor_len=D_TEST)
    keys = jax.random.split(jax.random.key(0), 24)
    modes = jnp.arange(24) % 2
    rollout = make_rollout(env, vm_policy)
    return env, keys, modes, rollout(keys, modes), rollout


@pytest.fixture(scope="module")
def ktd_runs():
    env = ca.KeyToDoor(distractor_len=D_TEST)
    keys = jax.random.split(jax.random.key(1), 24)
    modes = jnp.arange(24) % 2
    rollout = make_rollout(env, ktd_policy)
    return env, keys, modes, rollout(keys, modes), rollout


@pytest.mark.parametrize("game", ["vm", "ktd"])
def test_scripted_returns_and_success(game, vm_runs, ktd_runs):
    env, _, modes, (obs, rewards, dones, success, _), _ = vm_runs if game == "vm" else ktd_runs
    rewards, dones, success, modes = map(np.asarray, (rewards, dones, success, modes))
    explore, distractor, reward = env.phase_lengths
    assert rewards.shape == (24, explore + distractor + reward)
    # Episode length = sum of phases: done only at the last step.
    assert not dones[:, :-1].any() and dones[:, -1].all()
    # No reward while exploring; apples pay 1 each; the final phase pays 10 exactly when right.
    assert (rewards[:, :explore] == 0).all()
    assert np.isin(rewards[:, explore : explore + distractor], [0.0, 1.0]).all()
    final = rewards[:, explore + distractor :].sum(1)
    np.testing.assert_array_equal(final, np.where(modes == 0, 10.0, 0.0))
    np.testing.assert_array_equal(success[:, -1], (modes == 0).astype(np.float32))
    apples = rewards[:, explore : explore + distractor].sum(1)
    assert (apples >= 5).all()  # greedy reaches several of the 10 apples in 30 frames
    np.testing.assert_array_equal(rewards.sum(1), apples + final)


def test_oracle_return_at_default_length():
    """The module docstring's scripted optimum for D = 100: 37.1 +- 3.1 apples + 10."""
    env = ca.VisualMatch()
    keys = jax.random.split(jax.random.key(0), 32)
    _, rewards, dones, success, _ = make_rollout(env, vm_policy)(keys, jnp.zeros(32, jnp.int32))
    returns = np.asarray(rewards).sum(1)
    assert np.asarray(success)[:, -1].all() and np.asarray(dones)[:, -1].all()
    assert 44.0 <= returns.mean() <= 50.0  # 47.1 over 256 episodes in the bench


def test_vmatch_optimal_reward_timing(vm_runs):
    """The right door is 7 moves away at most: paid within the 10 reward frames, once."""
    env, _, modes, (_, rewards, _, _, state0), _ = vm_runs
    explore, distractor, _ = env.phase_lengths
    last = np.asarray(rewards)[:, explore + distractor :]
    target = np.asarray(state0.target)
    steps = {0: 7, 1: 4, 2: 7}  # b (1, 2), c (1, 5), e (1, 8) from (5, 5)
    for i in np.flatnonzero(np.asarray(modes) == 0):
        assert np.flatnonzero(last[i]).tolist() == [steps[int(target[i])] - 1]


def test_ktd_door_opens_on_second_reward_frame(ktd_runs):
    env, _, modes, (_, rewards, _, _, _), _ = ktd_runs
    explore, distractor, _ = env.phase_lengths
    last = np.asarray(rewards)[:, explore + distractor :]
    expected = np.where((np.asarray(modes) == 0)[:, None], [0.0, 10.0, 0.0], 0.0)
    np.testing.assert_array_equal(last, expected)


# ---------------------------------------------------------------------------------------------
# First and last frame of each phase, against an independent ASCII renderer.

_CHAR_COLOUR = {
    " ": ca.BACKGROUND,
    "#": ca.BORDER,
    "+": ca.PLAYER,
    "a": ca.APPLE,
    "k": ca.KEY,
    "d": ca.DOOR,
    "i": ca.INDICATOR,
    "R": ca.RED,
    "G": ca.GREEN,
    "B": ca.BLUE,
}


def ascii_obs(board: list[str], pos) -> np.ndarray:
    """[75] float32 expected observation: 5x5 chars around pos (pad ' '), coloured, CHW."""
    r, c = int(pos[0]), int(pos[1])
    rows = []
    for rr in range(r - 2, r + 3):
        rows.append(
            [
                board[rr][cc] if 0 <= rr < len(board) and 0 <= cc < len(board[0]) else " "
                for cc in range(c - 2, c + 3)
            ]
        )
    rgb = np.array([[ca.PALETTE[_CHAR_COLOUR[ch]] for ch in row] for row in rows])
    return rgb.transpose(2, 0, 1).reshape(-1).astype(np.float32)


def _board(grid, sprites):
    rows = [list(r) for r in grid]
    for ch, (r, c) in sprites:
        rows[r][c] = ch
    return ["".join(r) for r in rows]


def _strip(grid, chars, fill=" "):
    return [r.translate(str.maketrans({c: fill for c in chars})) for r in grid]


def test_phase_boundary_frames(vm_runs, ktd_runs):
    # Visual Match: frames 0 and 14 of explore show the cue; action 15 shows distractor frame 0.
    env, _, _, (obs, _, _, _, state0), _ = vm_runs
    obs = np.asarray(obs)
    explore, distractor, reward = env.phase_lengths
    i = 0
    cue = ca.VM_CUE_CELLS[int(state0.cue_cell[i])]
    colour = "RGB"[int(state0.door_colours[i, int(state0.target[i])]) - ca.RED]
    ring = _strip(ca.VM_EXPLORE_GRID, "p", "#")
    explore_board = _board(_strip(ring, "+"), [(colour, cue), ("+", (2, 5))])
    for t in (0, explore - 1):
        np.testing.assert_array_equal(obs[i, t], ascii_obs(explore_board, (2, 5)))
    kept = np.asarray(state0.apples[i])
    apples = [("a", tuple(cell)) for cell in ca.APPLE_CELLS[kept]]
    distractor_board = _board(_strip(ca.DISTRACTOR_GRID, "a+"), apples + [("+", (5, 5))])
    np.testing.assert_array_equal(obs[i, explore], ascii_obs(distractor_board, (5, 5)))
    hues = "RGB"
    doors = [
        (hues[int(state0.door_colours[i, j]) - ca.RED], tuple(ca.VM_DOOR_CELLS[j]))
        for j in range(3)
    ]
    reward_board = _board(_strip(ca.VM_REWARD_GRID, "bce+"), doors + [("+", (5, 5))])
    np.testing.assert_array_equal(obs[i, explore + distractor], ascii_obs(reward_board, (5, 5)))
    # Last frame of the episode: the right door was touched (all doors gone) at (1, col).
    col = int(ca.VM_DOOR_CELLS[int(state0.target[i]), 1])
    last_board = _board(_strip(ca.VM_REWARD_GRID, "bce+"), [("+", (1, col))])
    np.testing.assert_array_equal(obs[i, -1], ascii_obs(last_board, (1, col)))

    # Key-to-Door (mode 0 fetches the key): reward frame 0 and the last frame (on the door).
    env, _, _, (obs, _, _, _, state0), _ = ktd_runs
    obs = np.asarray(obs)
    explore, distractor, reward = env.phase_lengths
    key = tuple(ca.KTD_KEY_CELLS[int(state0.key_cell[i])])
    start = tuple(np.asarray(state0.pos[i]))
    explore_board = _board(_strip(ca.KTD_EXPLORE_GRID, "k+"), [("k", key), ("+", start)])
    np.testing.assert_array_equal(obs[i, 0], ascii_obs(explore_board, start))
    reward_board = _strip(ca.KTD_REWARD_GRID, "")
    np.testing.assert_array_equal(obs[i, explore + distractor], ascii_obs(reward_board, (3, 5)))
    # After 3 north moves the player is at (0, 5), past the open door.
    np.testing.assert_array_equal(
        obs[i, -1], ascii_obs(_board(_strip(ca.KTD_REWARD_GRID, "+"), [("+", (0, 5))]), (0, 5))
    )
    # The player that never took the key stays in front of the locked door.
    np.testing.assert_array_equal(
        obs[1, -1], ascii_obs(_board(_strip(ca.KTD_REWARD_GRID, "+"), [("+", (2, 5))]), (2, 5))
    )


# ---------------------------------------------------------------------------------------------
# API, registry, jit/vmap, determinism.


def test_registry_and_spaces():
    for game, phases in (("VisualMatch", (15, 10)), ("KeyToDoor", (10, 3))):
        for d in (100, 250, 500):
            env, params = envs.make(f"{game}-{d}")
            assert env.phase_lengths == (phases[0], d, phases[1])
            assert params.max_steps_in_episode == sum(phases) + d
            assert env.name == f"{game}-{d}"
        env, params = envs.make(game)
        assert env.distractor_len == 100
        assert env.observation_space(params).shape == (75,)
        assert env.action_space(params).n == 4
        assert env.episode_metrics == ("success",)
    with pytest.raises(ValueError, match="distractor_len"):
        ca.VisualMatch(distractor_len=0)
    with pytest.raises(ValueError, match="num_apples"):
        ca.KeyToDoor(num_apples=23)


def test_palette_matches_pycolab_scale():
    # c * 255 / 1000 truncated to uint8, e.g. the player (898, 584, 430) -> (228, 148, 109).
    np.testing.assert_array_equal(ca.PALETTE[ca.PLAYER], [228, 148, 109])
    np.testing.assert_array_equal(ca.PALETTE[ca.APPLE], [140, 178, 0])
    np.testing.assert_array_equal(ca.PALETTE[ca.BACKGROUND], [204, 204, 204])


def test_determinism_and_gymnax_step(vm_runs):
    env, keys, modes, (obs, rewards, *_rest), rollout = vm_runs
    again = rollout(keys, modes)  # same keys -> the same episodes
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(obs))
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(rewards))
    # Different keys give different layouts (cue cell, target, apples).
    _, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, env.default_params)
    assert len({(int(a), int(b)) for a, b in zip(state.cue_cell, state.target, strict=True)}) > 5
    # gymnax's auto-resetting step works under jit + vmap and returns float32 obs in 0..255.
    params = env.default_params
    obs0, vstate = jax.vmap(env.reset, in_axes=(0, None))(keys[:3], params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    out = step(keys[:3], vstate, jnp.array([0, 1, 2]), params)
    assert out[0].dtype == jnp.float32 and out[0].shape == (3, 75)
    assert float(out[0].max()) <= 255 and float(out[0].min()) >= 0


def test_shuffle_colours_per_episode():
    env = ca.VisualMatch(distractor_len=5)
    params = env.default_params.replace(shuffle_colours=True)
    keys = jax.random.split(jax.random.key(3), 64)
    _, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)
    colours = np.asarray(state.door_colours)
    assert (np.sort(colours, 1) == [ca.RED, ca.GREEN, ca.BLUE]).all()
    assert len({tuple(c) for c in colours}) == 6
    _, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, env.default_params)
    assert (np.asarray(state.door_colours) == [ca.RED, ca.GREEN, ca.BLUE]).all()


# ---------------------------------------------------------------------------------------------
# Step-by-step comparison with the original pycolab games.

SHM_GIT_DIR = os.environ.get("SHM_GIT_DIR", "/work/.mirror/thaihungle+SHM/repo")
_SRC = "pomdp-baselines/envs/credit_assign/key_to_door"
_FILES = ("common.py", "objects.py", "game.py", "visual_match.py", "key_to_door.py")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original game modules, loaded from the git mirror into a temp package."""
    pytest.importorskip("pycolab")
    if not os.path.isdir(SHM_GIT_DIR):
        pytest.skip(f"no thaihungle/SHM mirror at {SHM_GIT_DIR} (set SHM_GIT_DIR)")
    root = tmp_path_factory.mktemp("tvt")
    pkg = root / "tvt_original"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _FILES:
        result = subprocess.run(
            ["git", f"--git-dir={SHM_GIT_DIR}", "show", f"HEAD:{_SRC}/{name}"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot read {name} from the mirror: {result.stderr.strip()}")
        text = result.stdout.replace(
            "from envs.credit_assign.key_to_door import", "from tvt_original import"
        )
        (pkg / name).write_text(text)
    # pycolab 1.2's storytelling uses collections.Mapping/Sequence (gone since Python 3.10).
    patched = [n for n in ("Mapping", "Sequence") if not hasattr(collections, n)]
    for n in patched:
        setattr(collections, n, getattr(collections.abc, n))
    # ...and numpy-1 idioms in ascii_art (np.vstack over a generator, np.fromstring, int() of a
    # 1-element array) that numpy 2 rejects: load a fixed copy of that one module meanwhile.
    import pycolab
    from pycolab import ascii_art

    source = open(ascii_art.__file__).read()
    fixes = {
        "np.vstack(np.fromstring(line, dtype=np.uint8) for line in art)": (
            "np.vstack([np.frombuffer(line.encode('ascii'), dtype=np.uint8) for line in art])"
        ),
        "(int(row), int(col))": "(int(row[0]), int(col[0]))",
    }
    for old, new in fixes.items():
        assert old in source, f"pycolab's ascii_art changed: {old!r} not found"
        source = source.replace(old, new)
    fixed = types.ModuleType("pycolab.ascii_art")
    fixed.__file__ = ascii_art.__file__
    exec(compile(source, ascii_art.__file__, "exec"), fixed.__dict__)
    sys.modules["pycolab.ascii_art"] = pycolab.ascii_art = fixed
    sys.path.insert(0, str(root))
    try:
        mods = {n[:-3]: importlib.import_module(f"tvt_original.{n[:-3]}") for n in _FILES}
        yield mods
    finally:
        sys.path.remove(str(root))
        for n in list(sys.modules):
            if n.startswith("tvt_original"):
                del sys.modules[n]
        for n in patched:
            delattr(collections, n)
        sys.modules["pycolab.ascii_art"] = pycolab.ascii_art = ascii_art


class _Layout:
    """Makes the original's `keep_n_characters_in_grid` keep the cells we choose."""

    def __init__(self, common, keep: dict[str, list[tuple[int, int]]]):
        self.original = common.keep_n_characters_in_grid
        self.keep = keep
        self.background = common.BACKGROUND

    def __call__(self, grid, character, n, backdrop_char=None):
        backdrop_char = self.background if backdrop_char is None else backdrop_char
        cells = [tuple(p) for p in np.argwhere(np.array([list(r) for r in grid]) == character)]
        if n == 0 or n == len(cells):
            return self.original(grid, character, n, backdrop_char)
        keep = set(self.keep[character])
        assert len(keep) == n and keep <= set(cells)
        rows = [list(r) for r in grid]
        for r, c in cells:
            if (r, c) not in keep:
                rows[r][c] = backdrop_char
        return ["".join(r) for r in rows]


class _Choice(np.random.RandomState):
    def __init__(self, seed, target):
        super().__init__(seed)
        self.target = target

    def choice(self, *args, **kwargs):
        return self.target


def _to_pixels(colours):
    from pycolab import rendering

    mapping = {k: tuple(float(c) * 255 / 1000 for c in v) for k, v in colours.items()}
    convert = rendering.ObservationToArray(mapping, permute=(1, 2, 0), dtype=np.uint8)
    return lambda ob: np.transpose(convert(ob), (2, 0, 1)).reshape(-1).astype(np.float32)


def _compare(env, step, state, params, episode, to_pixels, actions):
    """Play `actions` in the original `episode` and in our env (jitted `step`), comparing."""
    ob, _, _ = episode.its_showtime()
    np.testing.assert_array_equal(np.asarray(env.get_obs(state, params)), to_pixels(ob))
    key = jax.random.key(0)
    total = 0.0
    for t, a in enumerate(actions):
        ob, r, _ = episode.play(int(a))
        obs, state, reward, done, info = step(key, state, int(a), params)
        r = 0.0 if r is None else float(r)
        total += r
        np.testing.assert_array_equal(np.asarray(obs), to_pixels(ob), err_msg=f"obs at step {t}")
        assert float(reward) == r, f"reward at step {t}: {float(reward)} vs {r}"
        assert bool(done) == episode.game_over, f"done at step {t}"
    assert episode.game_over
    assert float(info["success"]) == float(episode.the_plot["chapter_reward"] > 0)
    return total


def _mixed_actions(env, step, policy, state, params, rng, mode, eps):
    """Actions of the jitted scripted `policy(state, mode)` with probability 1 - eps, else
    uniform, played in our env."""
    actions = []
    for _ in range(env.episode_len):
        a = int(policy(state, mode)) if rng.random() > eps else int(rng.integers(4))
        actions.append(a)
        state = step(jax.random.key(0), state, a, params)[1]
    return actions


@pytest.mark.pycolab
def test_matches_original_pycolab_visual_match(original, monkeypatch):
    vm, common = original["visual_match"], original["common"]
    env = ca.VisualMatch(distractor_len=D_TEST)
    step, policy = jax.jit(env.step_env), jax.jit(lambda s, m: vm_policy(env, s, m))
    rng = np.random.default_rng(0)
    successes = set()
    for episode_i in range(12):
        target, cue = int(rng.integers(3)), int(rng.integers(8))
        kept = np.zeros(22, bool)
        kept[rng.choice(22, 10, replace=False)] = True
        layout = _Layout(
            common,
            {"p": [tuple(ca.VM_CUE_CELLS[cue])], "a": [tuple(x) for x in ca.APPLE_CELLS[kept]]},
        )
        monkeypatch.setattr(common, "keep_n_characters_in_grid", layout)
        frames = dict(vm.MAX_FRAMES_PER_PHASE, distractor=D_TEST)
        game = vm.Game(
            _Choice(episode_i, "bce"[target]),
            apple_reward=1.0,
            final_reward=10.0,
            max_frames=frames,
            EXPLORE_GRID=vm.PASSIVE_EXPLORE_GRID,
        )
        hue = {(1000, 0, 0): 0, (0, 1000, 0): 1, (0, 0, 1000): 2}
        params = env.default_params.replace(symbol_hues=tuple(hue[game.colours[s]] for s in "bce"))
        state = env.init_state(target, cue, kept, params)
        mode, eps = episode_i % 2, (0.0, 0.3, 1.0)[episode_i % 3]
        actions = _mixed_actions(env, step, policy, state, params, rng, mode, eps)
        total = _compare(
            env, step, state, params, game.make_episode(), _to_pixels(game.colours), actions
        )
        successes.add(total >= 10)
    assert successes == {True, False}


@pytest.mark.pycolab
def test_matches_original_pycolab_key_to_door(original, monkeypatch):
    ktd, common = original["key_to_door"], original["common"]
    env = ca.KeyToDoor(distractor_len=D_TEST)
    step, policy = jax.jit(env.step_env), jax.jit(lambda s, m: ktd_policy(env, s, m))
    rng = np.random.default_rng(1)
    outcomes = set()
    # 12 layouts under scripted/random play, then one that skips the key and walks over its
    # cell in the distractor room (the key exists only in the explore phase: door stays shut).
    walk_over_key = [ca.SOUTH] * 10 + [ca.NORTH] * 4 + [ca.WEST] * 2 + [ca.NORTH] * (D_TEST - 3)
    for episode_i in range(13):
        key_cell, start = int(rng.integers(10)), int(rng.integers(10))
        kept = np.zeros(22, bool)
        kept[rng.choice(22, 10, replace=False)] = True
        if episode_i == 12:
            key_cell = 0  # (1, 3)
        layout = _Layout(
            common,
            {
                "k": [tuple(ca.KTD_KEY_CELLS[key_cell])],
                "+": [tuple(ca.KTD_START_CELLS[start])],
                "a": [tuple(x) for x in ca.APPLE_CELLS[kept]],
            },
        )
        monkeypatch.setattr(common, "keep_n_characters_in_grid", layout)
        frames = dict(ktd.MAX_FRAMES_PER_PHASE_SR, distractor=D_TEST)
        game = ktd.Game(None, apple_reward=1.0, final_reward=10.0, max_frames=frames)
        params = env.default_params
        state = env.init_state(key_cell, start, kept, params)
        mode, eps = episode_i % 2, (0.0, 0.3, 1.0)[episode_i % 3]
        if episode_i == 12:
            actions = walk_over_key
        else:
            actions = _mixed_actions(env, step, policy, state, params, rng, mode, eps)
        total = _compare(
            env, step, state, params, game.make_episode(), _to_pixels(game.colours), actions
        )
        outcomes.add(total >= 10)
    assert outcomes == {True, False}
