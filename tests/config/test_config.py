"""Config loading: YAML + dotted overrides, validated into typed dataclasses with one-line errors."""
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maspo_megatron.config import Config, ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_follow_maspo_paper():
    cfg = load_config()
    maspo = cfg.algorithm.maspo
    assert (maspo.sigma_base, maspo.alpha, maspo.sigma_high) == (1.0, 0.3, 10.0)
    assert (maspo.adv_low, maspo.adv_high, maspo.beta_pos, maspo.beta_neg) == (0.1, 10.0, 0.03, 0.03)
    assert maspo.gate_grad == "detached" and maspo.dual_clip_c is None
    assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.entropy_coef == 0.0


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, """
        algorithm:
          loss: grpo
          maspo: {alpha: 0.4}
        parallel: {tp: 2}
    """)
    cfg = load_config(path, ["algorithm.maspo.alpha=0.5", "parallel.pp=2", "trainer.lr=1e-6", "rollout.sglang.urls=[http://a:1]"])
    assert cfg.algorithm.loss == "grpo"
    assert cfg.algorithm.maspo.alpha == 0.5
    assert isinstance(cfg.algorithm.maspo.alpha, float)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.trainer.lr == 1e-6
    assert load_config(None, ["trainer.lr=3e-5"]).trainer.lr == 3e-5
    assert cfg.rollout.sglang.urls == ["http://a:1"]


def test_round_trip_through_dict():
    cfg = load_config(None, ["algorithm.loss=sapo", "data.val_files={a: x.jsonl}"])
    again = load_config.__globals__["from_dict"](Config, to_dict(cfg))
    assert again == cfg


def test_loss_hyper_matches_selected_section():
    cfg = load_config(None, ["algorithm.loss=dac", "algorithm.dac.eps_high=0.3"])
    assert cfg.algorithm.loss_hyper() == {"eps_low": 0.16, "eps_high": 0.3}


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("algorithm:\n  maspo:\n    alpha: -1\n", [], "algorithm.maspo.alpha: -1.0 must be >= 0"),
        ("algorithm:\n  maspo:\n    alpah: 0.3\n", [], "algorithm.maspo.alpah: unknown key"),
        ("parallel:\n  tp: two\n", [], "parallel.tp: expected an integer, got 'two'"),
        ("parallel:\n  tp: 1.5\n", [], "parallel.tp: expected an integer"),
        ("trainer:\n  resume: 1\n", [], "trainer.resume: expected true/false"),
        ("algorithm:\n  loss: ppo\n", [], "algorithm.loss: 'ppo' is not one of"),
        ("algorithm:\n  maspo:\n    gate_grad: maybe\n", [], "algorithm.maspo.gate_grad: 'maybe' is not one of"),
        ("", ["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs tp > 1"),
        ("", ["algorithm.maspo.sigma_high=0.5"], "algorithm.maspo.sigma_high: 0.5 must be >= sigma_base"),
        ("", ["trainer.nope=1"], "trainer.nope: unknown key"),
        ("", ["rollout.top_p=0"], "rollout.top_p: 0.0 must be > 0"),
        ("model: 3\n", [], "model: expected a mapping"),
        ("", ["algorithm.kl_estimator=k4"], "algorithm.kl_estimator: 'k4' is not one of"),
        ("", ["algorithm.tis_cap=2"], "algorithm.tis_cap: removed; use rollout_correction.is_level"),
        ("", ["algorithm.old_logprob_source=engine", "algorithm.rollout_correction.is_level=token"],
         "algorithm.rollout_correction: corrects trainer vs engine log-probs"),
        ("", ["algorithm.old_logprob_source=engine", "algorithm.rollout_correction.advantage_tis_cap=2"],
         "algorithm.rollout_correction: corrects trainer vs engine log-probs"),
        ("", ["algorithm.rollout_correction.is_level=token", "algorithm.rollout_correction.advantage_tis_cap=2"],
         "algorithm.rollout_correction.advantage_tis_cap: would correct the engine mismatch a second time"),
        ("", ["algorithm.rollout_correction.rs_level=token", "algorithm.rollout_correction.rs_lower=3"],
         "algorithm.rollout_correction.rs_lower: 3.0 must be <= rs_upper"),
        ("", ["algorithm.rollout_correction.rs_level=window"], "algorithm.rollout_correction.rs_level: 'window'"),
        ("", ["model.dtype=null"], "model.dtype: null is not allowed"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, overrides, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if yaml_text:
        assert str(path) in message


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = write(tmp_path, "model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: line \d+ invalid YAML"):
        load_config(broken)
    listy = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listy)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["algorithm.maspo.alpha"])
    with pytest.raises(ConfigError, match="algorithm.loss: expected a string"):
        load_config(None, ["algorithm.loss.x=1"])
    with pytest.raises(ConfigError, match="algorithm.loss: is a value, not a section"):
        load_config(None, ["algorithm.loss=grpo", "algorithm.loss.x=1"])


def test_every_field_has_a_default():
    def walk(cls):
        for field in dataclasses.fields(cls):
            assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, field.name
            if dataclasses.is_dataclass(field.type) if not isinstance(field.type, str) else False:
                walk(field.type)

    walk(Config)
    Config()  # constructible without arguments


def test_cli_error_is_one_line_without_traceback(tmp_path):
    """The entry point turns a ConfigError into one line on stderr and exit code 2."""
    path = write(tmp_path, "algorithm:\n  maspo:\n    alpha: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "maspo_megatron.train", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "algorithm.maspo.alpha: -1.0 must be >= 0" in proc.stderr


def test_registry_backed_choices_follow_the_registries():
    """loss, aggregation, advantage and KL estimator are checked at load against the algorithms registries."""
    from maspo_megatron.algorithms import ADVANTAGE_ESTIMATORS, AGGREGATION_MODES, KL_ESTIMATORS, loss_names

    for key, names in (("algorithm.loss", loss_names()), ("algorithm.aggregation", AGGREGATION_MODES),
                       ("algorithm.advantage", ADVANTAGE_ESTIMATORS), ("algorithm.kl_estimator", KL_ESTIMATORS)):
        for name in names:
            load_config(None, [f"{key}={name}"])
        with pytest.raises(ConfigError, match=f"^{key}: 'nope' is not one of \\[.*'{names[-1]}'"):
            load_config(None, [f"{key}=nope"])


def test_engine_and_transport_names_are_the_registries():
    """config/ cannot read rollout/'s registries (a lower floor): the trainer checks them first thing."""
    from maspo_megatron.rollout import registry
    from maspo_megatron.rollout.weight_sync.transports import TRANSPORTS

    for name in registry.engine_names():
        registry.check_rollout_names(load_config(None, [f"rollout.engine={name}"]).rollout)
    for name in ("auto", *TRANSPORTS):
        registry.check_rollout_names(load_config(None, [f"rollout.weight_sync.transport={name}"]).rollout)
    assert {"local", "sglang"} <= set(registry.engine_names())
    assert {"local", "tensor", "distributed", "disk"} <= set(TRANSPORTS)
    with pytest.raises(ValueError, match="^rollout.engine: 'vllm' is not one of \\['local', 'sglang'\\]$"):
        registry.check_rollout_names(load_config(None, ["rollout.engine=vllm"]).rollout)
    with pytest.raises(ValueError, match="^rollout.weight_sync.transport: 'ipc' is not one of \\['auto', 'disk'"):
        registry.check_rollout_names(load_config(None, ["rollout.weight_sync.transport=ipc"]).rollout)
    # an engine registered later is a valid choice at once
    registry.register_engine("test_engine", lambda rollout_cfg, **_: None, default_transport=lambda cuda: "disk")
    try:
        registry.check_rollout_names(load_config(None, ["rollout.engine=test_engine"]).rollout)
        assert registry.default_transport("test_engine", cuda=True) == "disk"
    finally:
        registry.unregister_engine("test_engine")
