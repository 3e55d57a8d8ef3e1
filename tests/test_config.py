from pathlib import Path

import pytest
import yaml
from pydantic import AfterValidator, BeforeValidator, ValidationError

from conftest import REPO
from wellocr import config as C
from wellocr.errors import UserError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = C.load_config(path)
    assert isinstance(cfg, C.Config)
    command = f"python -m wellocr.train --config {path.relative_to(REPO)}"  # as typed in the repository root
    assert path.read_text().startswith("#") and command in path.read_text()


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
    cfg = C.load_config(REPO / "configs" / "quick_val.yaml")
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


def test_no_config_lists_shipped_files(monkeypatch, tmp_path):
    monkeypatch.delenv(C.CONFIG_ENV_VAR, raising=False)
    monkeypatch.chdir(REPO)  # the listing is of ./configs, as seen from the repository root
    with pytest.raises(UserError, match=r"WELLOCR_CONFIG.*configs/cpu_smoke.yaml"):
        C.load_config(None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"WELLOCR_CONFIG.*none found in \./configs"):
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


def test_a_runs_config_is_read_by_its_run_directory(tmp_path):
    from wellocr.artifacts import load_run_config
    from wellocr.rundir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.read_config_data() is None
    with pytest.raises(UserError, match="no config.yaml there"):
        load_run_config(run.path)
    C.save_config(C.Config(), run.config_file)
    assert run.read_config_data() == yaml.safe_load(run.config_file.read_text())
    assert load_run_config(run.path) == C.Config()
    run.config_file.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        run.read_config_data()
    run.config_file.write_text("- a list\n")
    with pytest.raises(UserError, match="not a mapping of config sections"):
        run.read_config_data()


def test_trajectory_differences_ignore_mutable_keys():
    saved, requested = C.Config(), C.Config()
    requested.train.max_steps = 900
    requested.cost.budget_cap = 50
    requested.train.learning_rate = 1e-3
    requested.lora.r = 32
    assert C.trajectory_differences(saved, requested) == ["lora.r", "train.learning_rate"]


def test_config_reference_doc_is_in_sync():
    assert (REPO / "docs" / "CONFIG.md").read_text() == C.reference_markdown(), (
        "regenerate: python -m wellocr.config --reference > docs/CONFIG.md"
    )


def test_lowering_max_steps_below_default_eval_steps_blames_the_override(tmp_path):
    with pytest.raises(UserError, match=r"^--set: train.eval_steps \(50\) must not exceed train.max_steps \(20\)"):
        C.load_config(write(tmp_path, ""), ["max_steps=20"])


def test_every_key_in_the_reference_has_a_description_and_its_constraint():
    rows = {line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in (REPO / "docs" / "CONFIG.md").read_text().splitlines() if line.startswith("| `")}
    assert list(rows) == list(C.all_keys())
    for key, info in C.all_keys().items():
        kind, _default, allowed, meaning = rows[key]
        assert meaning and meaning == info.description, key
        constraints = [m for m in info.metadata if not isinstance(m, (BeforeValidator, AfterValidator))]
        constrained = constraints or "Literal" in str(info.annotation) or "auto" in kind
        assert bool(allowed) == bool(constrained), f"{key}: constraint {info.metadata} but allowed {allowed!r}"
    assert rows["train.max_steps"][2] == "> 0" and rows["model.backend"][2] == "one of auto, unsloth, hf"
    assert rows["train.per_device_train_batch_size"][:1] == ["int or auto"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("data:\n  max_pixels: abc\n", r"data.max_pixels must be an integer, got 'abc'"),
        ("train:\n  max_steps: true\n", r"train.max_steps must be an integer, got True"),
        ("lora:\n  lora_dropout: 1\n", r"lora.lora_dropout must be >= 0 and < 1, got 1"),
        ("model:\n  model_name: null\n", r"model.model_name must not be empty"),
        ("model:\n  load_in_4bit: maybe\n", r"model.load_in_4bit must be true or false, got 'maybe'"),
        ("run:\n  run_name: a/b\n", r"run.run_name must be letters, digits, '.', '_' or '-'"),
        ("checkpoint:\n  remote: http://x\n", r"checkpoint.remote must be an s3://, gs:// \(or file://\) URL"),
        ("checkpoint:\n  keep_recent: 0\n", r"checkpoint.keep_recent must be >= 1 \(the latest checkpoint"),
        ("train:\n  per_device_train_batch_size: lots\n", r"per_device_train_batch_size must be an integer or auto"),
        ("lora:\n  finetune_mlp_modules: false\n  finetune_attention_modules: false\n", r"nothing to train"),
        ("data:\n  min_pixels: 4096\n  max_pixels: 1024\n", r"data.min_pixels \(4096\) must not exceed data.max_"),
        ("train: 3\n", r"section 'train' must be a mapping"),
        ("lora_alpha: 8\nrun:\n  nme: x\n", r"unknown key 'run.nme' \(did you mean 'run_name'\?\)"),
    ],
)
def test_file_mistakes_are_one_line_errors_naming_the_file(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        C.load_config(write(tmp_path, text))
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path / "exp.yaml") + ": ")


def test_lax_coercion_of_yaml_and_set_values(tmp_path):
    cfg = C.load_config(write(tmp_path, "data:\n  max_pixels: 1e6\n  min_pixels: 1_024\nmodel:\n"
                                        "  use_gradient_checkpointing: false\n"),
                        ["per_device_train_batch_size=AUTO", "gpu_type=4090", "hourly_rate=null", "enabled=no"])
    assert (cfg.data.max_pixels, cfg.data.min_pixels) == (1_000_000, 1024)
    assert cfg.model.use_gradient_checkpointing == "false"
    assert (cfg.train.per_device_train_batch_size, cfg.cost.gpu_type, cfg.cost.hourly_rate) == ("auto", "4090", None)
    assert cfg.wandb.enabled is False and isinstance(cfg.data.max_pixels, int)


@pytest.mark.parametrize("value", ["none", "None", "", "null"])
def test_remote_opt_out_means_no_remote(tmp_path, value):
    assert C.load_config(write(tmp_path, ""), [f"checkpoint.remote={value}"]).checkpoint.remote is None
    cfg = C.Config()
    cfg.checkpoint.remote = value
    C.validate(cfg, {}, "x")
    assert cfg.checkpoint.remote is None


def test_values_assigned_in_code_are_checked_by_validate_naming_the_default_source():
    cfg = C.Config()
    section = cfg.eval
    cfg.eval.max_new_tokens = 0
    with pytest.raises(UserError, match=r"^wellocr.bench: eval.max_new_tokens must be > 0, got 0$"):
        C.validate(cfg, {}, "wellocr.bench")
    cfg.eval.max_new_tokens, cfg.cost.budget_cap = "64", 5
    C.validate(cfg, {}, "wellocr.bench")
    assert (cfg.eval.max_new_tokens, cfg.cost.budget_cap, cfg.eval is section) == (64, 5.0, True)


def test_offline_builders_only_for_the_paths_the_file_names(tmp_path):
    path = write(tmp_path, "data:\n  build_synthetic_if_missing: true\n  dataset_name: d\n"
                           "model:\n  build_tiny_if_missing: true\n")
    cfg = C.load_config(path)
    assert (cfg.data.build_synthetic_if_missing, cfg.model.build_tiny_if_missing) == (True, False)
    assert C.load_config(path, ["dataset_name=typo"]).data.build_synthetic_if_missing is False


def test_sections_refuse_unknown_fields_and_constructed_configs_compare_by_value():
    with pytest.raises(ValidationError, match="bogus"):
        C.DataConfig(bogus=1)
    assert C.Config(data=C.DataConfig(train_subset=5)) == C.Config(data=C.DataConfig(train_subset="5"))
    assert C.Config().to_dict()["train"]["max_steps"] == 500
    assert "train.max_steps" in C.MUTABLE_ON_RESUME and "lora.r" not in C.MUTABLE_ON_RESUME
    assert {"eval.batch_size", "cost.budget_cap", "wandb.enabled", "checkpoint.remote"} <= C.MUTABLE_ON_RESUME
