"""The typed config tree: precedence, errors that say what to change, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    flatten,
    load_config,
    preset_overrides,
    save_config,
    to_dict,
)
from pipeline.flows.config import PRESETS

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_precedence_defaults_yaml_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  steps: 7\ndata:\n  hflip: false\n")
    assert Config().train.lr == 1e-3
    cfg = load_config(f)
    assert (cfg.train.lr, cfg.train.steps, cfg.data.hflip) == (3e-4, 7, False)
    cfg = load_config(f, ["train.steps=9", "model.coupling=additive"])
    assert (cfg.train.lr, cfg.train.steps, cfg.model.coupling) == (3e-4, 9, "additive")


def test_unknown_key_names_the_key_and_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean train\.lr"):
        load_config(None, ["train.lrr=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("modle:\n  levels: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'modle'.*did you mean model"):
        load_config(f)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=2.5", r"train\.steps = 2\.5 \(float\).*int"),
        ("train.lr=fast", r"train\.lr = 'fast' \(str\).*float"),
        ("train.zero_stage=3", r"train\.zero_stage = 3.*one of 0, 1, 2"),
        ("data.hflip=maybe", r"data\.hflip = 'maybe'.*bool"),
        ("train=1", r"'train' is a section"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "run.name=x", "model.levels=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert flatten(to_dict(cfg))["train.lr"] == 2e-4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_a_moved_key_says_where_it_went():
    with pytest.raises(ConfigError, match="'train.max_rollbacks' is now 'guard.max_rollbacks'"):
        load_config(None, ["train.max_rollbacks=2"])
    assert load_config(None, ["guard.max_rollbacks=2"]).guard.max_rollbacks == 2


def test_a_removed_key_is_unknown_but_a_checkpoint_that_saved_it_still_loads_and_resumes(tmp_path):
    from pipeline.config import load_saved_config
    from pipeline.train import compat

    with pytest.raises(ConfigError, match="unknown config key 'model.power_iterations'"):
        load_config(None, ["model.power_iterations=1"])
    cfg = load_config(None, ["run.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    tree["model"]["power_iterations"] = 1  # as every checkpoint that had the key saved it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="unknown config key 'model.power_iterations'"):
        load_config(tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == cfg
    assert compat.check_resume(tmp_path, cfg, world_size=1, saved_world_size=1) == []


def test_deepspeed_knobs_pass_through_and_owned_keys_refuse():
    from pipeline.distributed import deepspeed_config

    cfg = load_config(
        None,
        ["train.deepspeed.zero_optimization.overlap_comm=true", "train.zero_stage=2"],
    )
    engine = deepspeed_config(cfg.train, world=2)
    assert engine["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
    assert engine["train_batch_size"] == 2 * cfg.train.micro_batch
    for override, instead in [
        ("train.deepspeed.zero_optimization.stage=1", "use train.zero_stage instead"),
        ("train.deepspeed.gradient_clipping=5", "use train.grad_clip instead"),
        ("train.deepspeed.optimizer.type=Adam", "the pipeline passes its own AdamW"),
    ]:
        with pytest.raises(ConfigError, match=instead):
            load_config(None, [override])


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_sets_its_keys(name):
    model = load_config(None, [f"model.preset={name}"]).model
    assert {k: getattr(model, k) for k in PRESETS[name]} == PRESETS[name]
    assert load_config(None, preset_overrides(name)) == load_config(None, [f"model.preset={name}"])


def test_keys_beside_a_preset_win_and_the_command_line_wins_over_the_file(tmp_path):
    for overrides in (
        ["model.preset=glow", "model.conv=svd"],
        ["model.conv=svd", "model.preset=glow"],
    ):
        model = load_config(None, overrides).model
        assert (model.coupling, model.conv, model.spectral_norm) == ("affine_exp", "svd", False)
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  conv: svd\n  preset: glow\n  levels: 3\n")
    model = load_config(f).model
    assert (model.coupling, model.conv, model.levels) == ("affine_exp", "svd", 3)
    model = load_config(f, ["model.preset=linear"]).model  # over the file's glow and levels
    assert (model.coupling, model.conv, model.levels) == ("none", "svd", 1)
    assert "preset" not in to_dict(load_config(f))["model"]  # the resolved tree holds the keys
    with pytest.raises(ConfigError, match=r"model\.preset = 'glw': must be one of certified, glow"):
        load_config(None, ["model.preset=glw"])


def test_config_command_lists_the_presets(capsys):
    from pipeline.__main__ import main

    assert main(["config", "model.preset=glow"]) == 0
    printed = capsys.readouterr().out
    assert f"#   glow: {' '.join(preset_overrides('glow'))}\n" in printed
    assert yaml.safe_load(printed)["model"]["coupling"] == "affine_exp"
