from pathlib import Path

import pytest
import yaml

from wellocr import config as C
from wellocr.errors import UserError

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = C.load_config(path)
    assert isinstance(cfg, C.Config)
    assert path.read_text().startswith("#") and "python -m wellocr.train --config " + str(path) in path.read_text()


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quick_val.yaml", "train_r16.yaml", "cpu_smoke.yaml"}


def test_defaults_are_the_seed_plan():
    cfg = C.Config()
    assert cfg.model.model_name == "unsloth/Qwen3-VL-2B-Instruct-unsloth-bnb-4bit"
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.train.learning_rate) == (16, 16, 2e-4)
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (2, 4)
    assert (cfg.train.optim, cfg.train.max_steps, cfg.train.eval_steps) == ("adamw_8bit", 500, 50)
    assert cfg.data.dataset_name == "wrath/well-log-headers-ocr"
    assert cfg.train.seed == 3407


def test_quick_val_matches_the_plan():
    cfg = C.load_config("configs/quick_val.yaml")
    assert (cfg.train.max_steps, cfg.data.train_subset, cfg.data.eval_subset, cfg.train.eval_steps) == (10, 100, 20, 5)


def test_yaml_scientific_notation_string_is_coerced_to_float(tmp_path):
    cfg = C.load_config(write(tmp_path, "train:\n  learning_rate: 2e-4\n"))
    assert cfg.train.learning_rate == pytest.approx(2e-4) and isinstance(cfg.train.learning_rate, float)


def test_set_overrides_yaml_with_types(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 100\n  eval_steps: 10\n  save_steps: 10\n")
    cfg = C.load_config(path, ["train.max_steps=20", "lora.finetune_vision_layers=false", "learning_rate=1e-4"])
    assert cfg.train.max_steps == 20
    assert cfg.lora.finetune_vision_layers is False
    assert cfg.train.learning_rate == pytest.approx(1e-4)


def test_bare_key_accepted_in_yaml_when_unambiguous(tmp_path):
    cfg = C.load_config(write(tmp_path, "max_steps: 60\nr: 8\n"))
    assert (cfg.train.max_steps, cfg.lora.r) == (60, 8)


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 10\n")
    with pytest.raises(UserError, match=r"exp.yaml: unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        C.load_config(path)


def test_unknown_override_key_names_set(tmp_path):
    with pytest.raises(UserError, match=r"--set: unknown key 'eval_step'.*did you mean 'eval_steps'"):
        C.load_config(write(tmp_path, ""), ["eval_step=3"])


def test_wrong_type_names_file_and_key(tmp_path):
    with pytest.raises(UserError, match=r"exp.yaml: train.max_steps must be an integer, got 'lots'"):
        C.load_config(write(tmp_path, "train:\n  max_steps: lots\n"))


def test_fractional_int_is_rejected(tmp_path):
    with pytest.raises(UserError, match="train.max_steps must be an integer"):
        C.load_config(write(tmp_path, "train:\n  max_steps: 2.5\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval_steps=600", r"train.eval_steps \(600\) must not exceed train.max_steps \(500\)"),
        ("per_device_train_batch_size=0", r"train.per_device_train_batch_size must be > 0"),
        ("learning_rate=0", r"train.learning_rate must be > 0"),
        ("lora.r=-1", r"lora.r must be > 0"),
        ("train_subset=0", r"data.train_subset must be a positive row count or -1"),
        ("backend=tpu", r"model.backend must be one of auto, unsloth, hf"),
    ],
)
def test_impossible_values_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(UserError, match=message) as info:
        C.load_config(write(tmp_path, ""), [override])
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("--set:")


def test_impossible_value_from_file_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"^.*exp.yaml: train.eval_steps"):
        C.load_config(write(tmp_path, "train:\n  max_steps: 10\n  eval_steps: 20\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nope.yaml: config file not found"):
        C.load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"exp.yaml: not valid YAML \(line \d+\)"):
        C.load_config(write(tmp_path, "train:\n  max_steps: [1\n"))


def test_config_from_env_var(tmp_path, monkeypatch):
    path = write(tmp_path, "train:\n  max_steps: 7\n  eval_steps: 7\n  save_steps: 7\n")
    monkeypatch.setenv(C.CONFIG_ENV_VAR, str(path))
    assert C.load_config(None).train.max_steps == 7


def test_no_config_lists_shipped_files(monkeypatch):
    monkeypatch.delenv(C.CONFIG_ENV_VAR, raising=False)
    with pytest.raises(UserError, match=r"WELLOCR_CONFIG.*configs/cpu_smoke.yaml"):
        C.load_config(None)


def test_python_config_files_are_not_executed(tmp_path):
    path = tmp_path / "exp.py"
    marker = tmp_path / "executed"
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(UserError):
        C.load_config(path)
    assert not marker.exists()


def test_run_name_from_skypilot_task_id_is_stable():
    cfg = C.Config()
    env = {"SKYPILOT_TASK_ID": "sky-managed-2026-11-28-10-00-00-123456_wellocr-train_7-0"}
    first = C.default_run_name(cfg, env, now=1_000)
    again = C.default_run_name(cfg, env, now=9_999_999)
    assert first == again == ("sky-managed-2026-11-28-10-00-00-123456_wellocr-train_7-0", "SKYPILOT_TASK_ID")


def test_explicit_run_name_wins_over_skypilot():
    cfg = C.Config()
    cfg.run.run_name = "mine"
    assert C.default_run_name(cfg, {"SKYPILOT_TASK_ID": "x"}) == ("mine", "config")


def test_generated_run_name_describes_the_config():
    name, how = C.default_run_name(C.Config(), {}, now=0)
    assert how == "generated"
    assert name == "qwen3-vl-2b-r16-lr2e-04-s500-19700101-000000"


def test_saved_config_round_trips_and_redacts_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-wandb-key-123")
    cfg = C.Config()
    cfg.wandb.entity = "sekrit-wandb-key-123"  # a secret pasted into a value never reaches disk
    C.save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "sekrit" not in text
    cfg.wandb.entity = None
    saved = yaml.safe_load(text)
    assert saved["wandb"]["entity"] == "***"
    saved["wandb"]["entity"] = None
    reloaded = C.config_from_dict(saved, "config.yaml")
    assert reloaded == cfg


def test_trajectory_differences_ignore_mutable_keys():
    saved, requested = C.Config(), C.Config()
    requested.train.max_steps = 900
    requested.cost.budget_cap = 50
    requested.train.learning_rate = 1e-3
    requested.lora.r = 32
    assert C.trajectory_differences(saved, requested) == ["lora.r", "train.learning_rate"]


def test_config_reference_doc_is_in_sync():
    assert Path("docs/CONFIG.md").read_text() == C.reference_markdown(), (
        "regenerate: python -m wellocr.config --reference > docs/CONFIG.md"
    )


def test_lowering_max_steps_below_default_eval_steps_blames_the_override(tmp_path):
    with pytest.raises(UserError, match=r"^--set: train.eval_steps \(50\) must not exceed train.max_steps \(20\)"):
        C.load_config(write(tmp_path, ""), ["max_steps=20"])
