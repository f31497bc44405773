"""config.py: the default agent's SHM start, the paper preset's, and configs written before a
default changed."""

import dataclasses
import json

import pytest

import run
import train
from config import FORMER_DEFAULTS, PRESETS, Config


def test_default_agent_uses_the_bounded_start_and_the_paper_preset_the_papers_init():
    cfg = Config(env="RepeatPreviousEasy")
    setup = train.make_env_and_network(cfg)
    assert (setup.memory.theta_init, setup.memory.calib_init) == ("xavier_abs", "zeros")
    paper = dataclasses.replace(PRESETS["paper-popgym"], env="RepeatPreviousEasy")
    setup = train.make_env_and_network(paper)
    assert (setup.memory.theta_init, setup.memory.calib_init) == ("xavier", "lecun")
    # the layer's own defaults stay the paper's
    from shm_jax import SHM

    assert (SHM(4).theta_init, SHM(4).calib_init) == ("xavier", "lecun")


@pytest.mark.parametrize("memory", ["gru", "lru", "shm_nocal", "shm_fixed"])
def test_memories_without_w_c_ignore_the_default_calib_init(memory):
    train.make_env_and_network(Config(env="RepeatPreviousEasy", memory=memory))


def test_a_config_json_without_a_changed_default_loads_with_the_former_value(tmp_path):
    fields = dataclasses.asdict(Config(out=str(tmp_path)))
    for name in FORMER_DEFAULTS:
        del fields[name]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    cfg = run.load_config(str(tmp_path))
    assert cfg.calib_init == "lecun" != Config().calib_init
    fields["calib_init"] = "zeros"
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert run.load_config(str(tmp_path)).calib_init == "zeros"
