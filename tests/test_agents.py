"""The two agents' pieces: the episode step index, the time embeddings, the authors' POPGym agent
(`--agent paper`) and its RLlib PPO (`--preset paper-popgym`): KL penalty, its adaptation rule,
the loss-value clip, batch-wide advantages, no gradient clipping."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run
import train
from train import Config

# --------------------------------------------------------------------------------------------
# Pure pieces, against independent references
# --------------------------------------------------------------------------------------------


def episode_step_loop(t_last, resets):
    """Reference: a plain loop over time, t = 0 at a reset, else previous t + 1."""
    T, B = resets.shape
    out = np.zeros((T, B), np.int64)
    prev = np.asarray(t_last).copy()
    for t in range(T):
        prev = np.where(resets[t], 0, prev + 1)
        out[t] = prev
    return out


def test_episode_step_matches_loop():
    rng = np.random.default_rng(0)
    for T, B in ((1, 3), (7, 5), (40, 2)):
        resets = rng.random((T, B)) < 0.2
        t_last = rng.integers(0, 50, B)
        got = np.asarray(train.episode_step(jnp.asarray(t_last, jnp.int32), jnp.asarray(resets)))
        np.testing.assert_array_equal(got, episode_step_loop(t_last, resets))


def test_sinusoidal_table_is_the_authors_formula():
    """pe[t, 2i] = sin(t w_i), pe[t, 2i+1] = cos(t w_i), w_i = exp(-2i ln(1024) / 128)."""
    table = train.sinusoidal_table(1024, 128)
    assert table.shape == (1024, 128) and table.dtype == np.float32
    for t, i in ((0, 0), (1, 0), (5, 3), (700, 63), (1023, 17)):
        w = math.exp(-2 * i * math.log(1024) / 128)
        assert table[t, 2 * i] == pytest.approx(math.sin(t * w), abs=1e-6)
        assert table[t, 2 * i + 1] == pytest.approx(math.cos(t * w), abs=1e-6)
    # the slowest frequency is 1/1024^(126/128), not the usual 1/10000^(126/128)
    assert table[1, 127] == pytest.approx(math.cos(1024 ** (-126 / 128)), abs=1e-7)
    # steps past the table reuse its last row
    enc = train.time_encoding(jnp.array([1023, 5000]), 128)
    np.testing.assert_array_equal(enc[0], enc[1])


@pytest.mark.parametrize(
    "kl,expected",
    [(0.05, 0.3), (0.021, 0.3), (0.02, 0.2), (0.01, 0.2), (0.005, 0.2), (0.0049, 0.1), (0.0, 0.1)],
)
def test_kl_coeff_update_rule(kl, expected):
    """RLlib 2.3 `update_kl`: x1.5 when kl > 2 target, x0.5 when kl < target / 2 (target 0.01)."""
    got = float(train.adapt_kl_coeff(jnp.float32(0.2), jnp.float32(kl), 0.01))
    assert got == pytest.approx(expected, rel=1e-6)


def test_kl_divergence_against_hand_computation():
    p_logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    q_logits = jnp.log(jnp.array([0.5, 0.25, 0.25])) + 3.0  # logits are shift-invariant
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    assert float(train.kl_divergence(p_logits, q_logits, False)) == pytest.approx(expected, 1e-5)
    # Gaussian: KL(N(0, 1) || N(1, 2^2)) = ln 2 + (1 + 1) / 8 - 1/2
    old = (jnp.zeros((1,)), jnp.zeros((1,)))
    new = (jnp.ones((1,)), jnp.log(jnp.full((1,), 2.0)))
    expected = math.log(2.0) + 2.0 / 8.0 - 0.5
    assert float(train.kl_divergence(old, new, True)) == pytest.approx(expected, 1e-5)


def test_project_params_clamps_only_the_time_strength():
    params = {"params": {"time_strength": jnp.float32(1.7), "Dense_0": {"bias": jnp.ones(3) * 4}}}
    out = train.project_params(params)
    assert float(out["params"]["time_strength"]) == 1.0
    np.testing.assert_array_equal(
        out["params"]["Dense_0"]["bias"], params["params"]["Dense_0"]["bias"]
    )
    neg = train.project_params({"params": {"time_strength": jnp.float32(-0.3)}})
    assert float(neg["params"]["time_strength"]) == 0.0


# --------------------------------------------------------------------------------------------
# The paper preset
# --------------------------------------------------------------------------------------------


def test_paper_preset_settings_and_memory_size_by_level():
    cfg = run.parse_config(["--preset", "paper-popgym", "--env", "AutoencodeEasy"])
    assert cfg.agent == "paper" and cfg.prev_action is False
    assert (cfg.num_envs, cfg.num_steps, cfg.num_epochs, cfg.num_minibatches) == (64, 1024, 30, 8)
    assert (cfg.lr, cfg.gamma, cfg.gae_lambda, cfg.clip_eps) == (5e-5, 0.99, 1.0, 0.3)
    assert (cfg.ent_coef, cfg.vf_coef, cfg.max_grad_norm, cfg.vf_loss_clip) == (0.0, 1.0, 0.0, 10.0)
    assert (cfg.kl_coeff, cfg.kl_target, cfg.adv_norm) == (0.2, 0.01, "batch")
    assert cfg.steps_per_update == 65_536 and cfg.total_timesteps == 15_000_000
    sizes = {
        env: run.parse_config(["--preset", "paper-popgym", "--env", env]).mem_size
        for env in ("AutoencodeEasy", "BattleshipMedium", "RepeatPreviousHard")
    }
    assert sizes == {"AutoencodeEasy": 128, "BattleshipMedium": 64, "RepeatPreviousHard": 32}
    gru = run.parse_config(["--preset", "paper-popgym", "--memory", "gru"])
    assert gru.mem_size == 64
    # an explicit size wins once auto sizing is turned off
    fixed = run.parse_config(
        ["--preset", "paper-popgym", "--no-memory-size-auto", "--memory-size", "24"]
    )
    assert fixed.mem_size == 24


TINY_PAPER = dataclasses.replace(
    train.PRESETS["paper-popgym"],
    env="RepeatPreviousEasy",
    memory="shm",
    memory_size_auto=False,
    memory_size=8,
    num_envs=4,
    num_steps=32,
    num_minibatches=2,
    num_epochs=2,
    total_timesteps=4 * 32 * 2,
    lr=1e-3,
    progress=False,
)


def param_shapes(cfg: Config):
    setup = train.make_env_and_network(cfg)
    N = 3
    carry = setup.network.initialize_carry((N,))
    obs = jnp.zeros((1, N, setup.venv.obs_dim))
    resets = jnp.ones((1, N), bool)
    aux = setup.memory.sample_aux(jax.random.key(0), (1, N))
    params = setup.network.init(jax.random.key(1), carry, obs, resets, aux)
    return jax.tree.map(jnp.shape, params["params"]), setup


def test_paper_agent_shapes_shm_and_gru():
    shapes, setup = param_shapes(TINY_PAPER)
    assert shapes["feature_map"]["Dense_0"]["kernel"] == (4, 128)
    assert shapes["preprocessor"]["Dense_0"]["kernel"] == (128, 64)
    assert shapes["memory"]["out_proj"]["kernel"] == (8, 1024)  # SHM's read-out widened to 1024
    assert shapes["postprocessor"]["Dense_0"]["kernel"] == (1024, 64)
    assert shapes["time_strength"] == ()
    assert shapes["actor_out"]["Dense_0"]["kernel"] == (64, 4)
    assert shapes["critic_out"]["Dense_0"]["kernel"] == (64, 1)
    gru_shapes, _ = param_shapes(dataclasses.replace(TINY_PAPER, memory="gru"))
    assert "time_strength" not in gru_shapes  # the authors' GRU model has no time embedding
    assert gru_shapes["postprocessor"]["Dense_0"]["kernel"] == (8, 64)


def test_paper_time_embedding_variants():
    """--paper-time-embedding: blend (the authors', a learned strength), append (16 more inputs
    to the preprocessor), off (neither)."""
    shapes = {
        te: param_shapes(dataclasses.replace(TINY_PAPER, paper_time_embedding=te))[0]
        for te in ("blend", "append", "off")
    }
    assert shapes["blend"]["preprocessor"]["Dense_0"]["kernel"] == (128, 64)
    assert shapes["append"]["preprocessor"]["Dense_0"]["kernel"] == (144, 64)
    assert shapes["off"]["preprocessor"]["Dense_0"]["kernel"] == (128, 64)
    assert "time_strength" in shapes["blend"]
    assert "time_strength" not in shapes["append"] and "time_strength" not in shapes["off"]
    # --paper-time-strength: where the blend's s starts (the authors' 0.5), inside [0, 1]
    for s0 in (0.5, 0.75):
        _, setup = param_shapes(dataclasses.replace(TINY_PAPER, paper_time_strength=s0))
        N = 2
        args = (setup.network.initialize_carry((N,)), jnp.ones((1, N, setup.venv.obs_dim)))
        args += (jnp.ones((1, N), bool), jnp.zeros((1, N), jnp.int32))
        params = setup.network.init(jax.random.key(1), *args)["params"]
        assert float(params["time_strength"]) == s0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--paper-time-strength must be in"):
            train.validate(dataclasses.replace(TINY_PAPER, paper_time_strength=bad))
    # --paper-append-width: the appended code's width (128: the blend's code, appended)
    wide = dict(paper_time_embedding="append", paper_append_width=128)
    wide_shapes, _ = param_shapes(dataclasses.replace(TINY_PAPER, **wide))
    assert wide_shapes["preprocessor"]["Dense_0"]["kernel"] == (256, 64)
    for bad, match in (
        (dict(wide, paper_append_width=15), "even width"),
        (dict(paper_append_width=128), "add --paper-time-embedding append"),
        (dict(wide, paper_append_scale=0.0), "--paper-append-scale must be > 0"),
        (dict(paper_append_scale=0.5), "add --paper-time-embedding append"),
        (dict(wide, paper_time_strength=0.3), "use --paper-time-embedding blend"),
        (dict(wide, paper_append_pad=-1), "--paper-append-pad must be >= 0"),
        (dict(paper_append_pad=8), "add --paper-time-embedding append"),
    ):
        with pytest.raises(ValueError, match=match):
            train.validate(dataclasses.replace(TINY_PAPER, **bad))


def test_paper_append_scale_and_pad_act_on_the_code_only():
    """--paper-append-scale c with params P acts as scale 1 with the preprocessor's rows for the
    appended code multiplied by c; --paper-append-pad n adds n inert inputs: with those rows
    dropped, the unpadded agent gives the same outputs."""
    T, N = 6, 3

    def build(**knobs):
        cfg = dataclasses.replace(TINY_PAPER, paper_time_embedding="append", **knobs)
        setup = train.make_env_and_network(cfg)
        obs = jax.random.normal(jax.random.key(2), (T, N, setup.venv.obs_dim))
        resets = jnp.zeros((T, N), bool).at[0].set(True)
        aux = setup.memory.sample_aux(jax.random.key(0), (T, N))
        args = (setup.network.initialize_carry((N,)), obs, resets, aux)
        params = setup.network.init(jax.random.key(1), *args)["params"]
        return params, lambda p: jax.tree.leaves(setup.network.apply({"params": p}, *args))

    def assert_same(a, b):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

    p1, apply1 = build()
    p_scaled, apply_scaled = build(paper_append_scale=2.5)
    k = p1["preprocessor"]["Dense_0"]["kernel"]  # [128 features + 16 code, 64]
    p1["preprocessor"]["Dense_0"]["kernel"] = k.at[128:].multiply(2.5)
    assert_same(apply1(p1), apply_scaled(p_scaled))
    p_pad, apply_pad = build(paper_append_pad=40)
    out_pad = apply_pad(p_pad)
    k = p_pad["preprocessor"]["Dense_0"]["kernel"]
    assert k.shape == (128 + 16 + 40, 64)
    p_pad["preprocessor"]["Dense_0"]["kernel"] = k[:144]  # the padded params, pad rows dropped
    assert_same(out_pad, apply1(p_pad))


def test_paper_agent_ablation_knobs():
    """--paper-readout (0 = H), --paper-memory-input and --paper-input-norm change exactly their
    layer; the GRU keeps its hidden state as output whatever --paper-readout says."""
    cfg = dataclasses.replace(TINY_PAPER, paper_readout=0, paper_memory_input=96)
    shapes, _ = param_shapes(cfg)
    assert shapes["preprocessor"]["Dense_0"]["kernel"] == (128, 96)
    assert shapes["memory"]["out_proj"]["kernel"] == (8, 8)
    assert shapes["postprocessor"]["Dense_0"]["kernel"] == (8, 64)
    gru, _ = param_shapes(dataclasses.replace(TINY_PAPER, memory="gru", paper_readout=256))
    assert gru["postprocessor"]["Dense_0"]["kernel"] == (8, 64)
    # --paper-heads default: the default agent's two ReLU heads straight on the read-out
    heads, _ = param_shapes(dataclasses.replace(TINY_PAPER, paper_heads="default", hidden=48))
    assert "postprocessor" not in heads and "actor_out" not in heads
    assert [heads[f"Dense_{i}"]["kernel"] for i in range(4)] == [
        (1024, 48),
        (48, 4),
        (1024, 48),
        (48, 1),
    ]
    # The LayerNorm has no parameters, so check what it does: without it the preprocessor sees
    # the feature map's raw output, whose scale follows the observation's.
    _, setup = param_shapes(TINY_PAPER)
    _, setup_off = param_shapes(dataclasses.replace(TINY_PAPER, paper_input_norm=False))
    assert setup.network.input_norm and not setup_off.network.input_norm
    N = 2
    obs = 50.0 * jnp.ones((1, N, setup.venv.obs_dim))
    args = (setup.network.initialize_carry((N,)), obs, jnp.ones((1, N), bool))
    aux = jnp.zeros((1, N), jnp.int32)
    params = setup.network.init(jax.random.key(1), *args, aux)
    _, logits_on, _ = setup.network.apply(params, *args, aux)
    _, logits_off, _ = setup_off.network.apply(params, *args, aux)
    assert not np.allclose(logits_on, logits_off, rtol=1e-3)
    for bad in (dict(paper_memory_input=0), dict(paper_readout=-1)):
        with pytest.raises(ValueError, match="--paper-"):
            train.validate(dataclasses.replace(TINY_PAPER, **bad))


def test_paper_feature_map_and_bias_knobs():
    """--no-paper-feature-map feeds the observation (and the appended step encoding) straight to
    the preprocessor; --paper-bias-init zeros starts every bias at 0, torch (the authors') at
    U(±1/√fan_in), drawn per layer; the weights are the same either way."""
    no_map = dict(paper_feature_map=False, paper_input_norm=False, paper_time_embedding="append")
    shapes, setup = param_shapes(dataclasses.replace(TINY_PAPER, **no_map))
    assert "feature_map" not in shapes
    assert shapes["preprocessor"]["Dense_0"]["kernel"] == (setup.venv.obs_dim + 16, 64)
    for bad in (dict(no_map, paper_input_norm=True), dict(no_map, paper_time_embedding="blend")):
        with pytest.raises(ValueError, match="--no-paper-feature-map"):
            train.validate(dataclasses.replace(TINY_PAPER, **bad))
    # The GRU has no time embedding, so it needs only --no-paper-input-norm.
    gru = dict(no_map, memory="gru", paper_time_embedding="blend")
    train.validate(dataclasses.replace(TINY_PAPER, **gru))

    def init(**kw):
        _, setup = param_shapes(dataclasses.replace(TINY_PAPER, **kw))
        N = 2
        args = (setup.network.initialize_carry((N,)), jnp.ones((1, N, setup.venv.obs_dim)))
        args += (jnp.ones((1, N), bool), jnp.zeros((1, N), jnp.int32))
        return setup.network.init(jax.random.key(1), *args)["params"]

    torch, zeros = init(), init(paper_bias_init="zeros")
    for layer in ("feature_map", "preprocessor", "postprocessor", "actor_hidden", "critic_out"):
        dense_t, dense_z = torch[layer]["Dense_0"], zeros[layer]["Dense_0"]
        np.testing.assert_array_equal(dense_t["kernel"], dense_z["kernel"])
        np.testing.assert_array_equal(dense_z["bias"], 0.0)
        bound = 1.0 / math.sqrt(dense_t["kernel"].shape[0])
        b = np.asarray(dense_t["bias"])
        assert np.all(np.abs(b) <= bound) and np.all(b != 0), layer
        if b.size > 8:  # spread like U(±bound), whose std is 0.58 bound
            assert np.std(b) > 0.3 * bound, layer


@pytest.mark.parametrize("agent", ["default", "paper"])
def test_memory_flags_reach_the_memory_in_both_agents(agent):
    """--theta-init, --calib-init and --memory-method configure SHM, --memory-unroll the GRU, in
    either agent (0 = the backend's choice: None on the module); --calib-init zeros starts W_c at
    0 and leaves every other parameter as the default draws it."""
    base = dataclasses.replace(TINY_PAPER, agent=agent)
    flags = dict(theta_init="xavier_abs", memory_method="chunked", calib_init="zeros")
    setup = train.make_env_and_network(dataclasses.replace(base, **flags))
    shm = setup.memory
    assert (shm.theta_init, shm.method, shm.calib_init) == ("xavier_abs", "chunked", "zeros")
    default = train.make_env_and_network(base)
    assert (default.memory.method, default.memory.calib_init) == ("auto", "lecun")

    def init(setup, N=2):
        args = (setup.network.initialize_carry((N,)), jnp.ones((1, N, setup.venv.obs_dim)))
        args += (jnp.ones((1, N), bool), jnp.zeros((1, N), jnp.int32))
        params = setup.network.init(jax.random.key(1), *args)
        return jax.tree_util.tree_flatten_with_path(params)[0]

    zeros, lecun = init(setup), init(default)
    for (path, a), (_, b) in zip(zeros, lecun, strict=True):
        name = jax.tree_util.keystr(path)
        if "calib_proj" in name:
            assert not np.any(a) and np.any(b), name
        elif "theta" not in name:
            np.testing.assert_array_equal(a, b, err_msg=name)
    gru = lambda **kw: train.make_env_and_network(dataclasses.replace(base, memory="gru", **kw))
    assert gru(memory_unroll=16).memory.unroll == 16
    assert gru().memory.unroll is None


def test_paper_agent_init_scales():
    """Last layers N(0, 0.01^2); other weights orthogonal (gain 1); torch's uniform bias."""
    setup = train.make_env_and_network(dataclasses.replace(TINY_PAPER, memory="gru"))
    N = 2
    params = setup.network.init(
        jax.random.key(4),
        setup.network.initialize_carry((N,)),
        jnp.zeros((1, N, setup.venv.obs_dim)),
        jnp.ones((1, N), bool),
        jnp.zeros((1, N), jnp.int32),
    )["params"]
    logits_w = np.asarray(params["actor_out"]["Dense_0"]["kernel"])
    assert 0.003 < logits_w.std() < 0.03
    w = np.asarray(params["preprocessor"]["Dense_0"]["kernel"])  # [128, 64]: orthonormal columns
    np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-5)
    bias = np.asarray(params["preprocessor"]["Dense_0"]["bias"])
    assert np.abs(bias).max() <= 1 / math.sqrt(128) and np.abs(bias).std() > 0


def test_time_embedding_uses_the_step_index_not_the_env():
    """Same observations, different step indices (carried t_last) -> different outputs."""
    _, setup = param_shapes(TINY_PAPER)
    net = setup.network
    N, T = 2, 5
    carry = net.initialize_carry((N,))
    obs = jax.random.normal(jax.random.key(2), (T, N, setup.venv.obs_dim))
    no_reset = jnp.zeros((T, N), bool)
    aux = setup.memory.sample_aux(jax.random.key(3), (T, N))
    params = net.init(jax.random.key(1), carry, obs, no_reset, aux)
    (_, t_end), logits0, _ = net.apply(params, carry, obs, no_reset, aux)
    later = (carry[0], carry[1] + 100)
    _, logits1, _ = net.apply(params, later, obs, no_reset, aux)
    np.testing.assert_array_equal(np.asarray(t_end), np.full(N, T))
    assert float(jnp.abs(logits0 - logits1).max()) > 1e-6
    # with s = 0 the embedding is off, and the step index no longer matters
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if p[-1].key == "time_strength" else x, params
    )
    a = net.apply(zeroed, carry, obs, no_reset, aux)[1]
    b = net.apply(zeroed, later, obs, no_reset, aux)[1]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.fixture(scope="module")
def paper_run():
    train_fn = jax.jit(train.make_train(TINY_PAPER))
    runner, metrics = train_fn(train.make_keys(TINY_PAPER))
    return jax.device_get(runner), jax.device_get(metrics)


def test_paper_update_runs_and_adapts_kl(paper_run):
    runner, metrics = paper_run
    kl, coeff = metrics["kl"][:, 0], metrics["kl_coeff"][:, 0]
    assert coeff[0] == pytest.approx(0.2)
    # The coefficient after update u follows RLlib's rule from that update's mean KL.
    expected_next = float(train.adapt_kl_coeff(jnp.float32(coeff[-1]), jnp.float32(kl[-1]), 0.01))
    assert float(runner.kl_coeff[0]) == pytest.approx(expected_next, rel=1e-6)
    for u in range(len(kl) - 1):
        assert coeff[u + 1] == pytest.approx(
            float(train.adapt_kl_coeff(jnp.float32(coeff[u]), jnp.float32(kl[u]), 0.01)), rel=1e-6
        )
    assert np.all(np.isfinite(metrics["value_loss"])) and np.all(metrics["kl"] >= 0)
    assert np.all(metrics["ratio_dev_first"] < 1e-5)  # θ replay holds in the paper agent too
    s = float(runner.params["params"]["time_strength"][0])
    assert 0.0 <= s <= 1.0 and s != 0.5  # learned, and kept in range


def test_value_loss_clip_caps_the_squared_error():
    """With --vf-loss-clip c the loss is mean(min((v - target)^2, c)): targets far from the
    values give exactly c."""
    cfg = dataclasses.replace(TINY_PAPER, vf_loss_clip=0.25)
    setup = train.make_env_and_network(cfg)
    N, T = 2, 3
    carry = setup.network.initialize_carry((N,))
    obs = jnp.zeros((T, N, setup.venv.obs_dim))
    resets = jnp.zeros((T, N), bool).at[0].set(True)
    aux = jnp.zeros((T, N), jnp.int32)
    params = setup.network.init(jax.random.key(0), carry, obs, resets, aux)
    _, policy_out, value = setup.network.apply(params, carry, obs, resets, aux)
    targets = value + jnp.where(jnp.arange(T)[:, None] == 0, 0.1, 100.0)  # one small error
    loss = train.value_loss(cfg, value, value, targets)
    assert float(loss) == pytest.approx((0.01 + 2 * 0.25) / 3, rel=1e-5)
