"""`python -m wellocr.export`: adapter + model card, merged weights, and the Hub upload (up to the network call)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import strip_results
from wellocr import export as E
from wellocr.artifacts import load_run_config
from wellocr.checkpoint import incomplete_reason
from wellocr.config import CostConfig
from wellocr.errors import UserError
from wellocr.ledger import CostLedger
from wellocr.model import Backend, load_base_model, load_for_inference
from wellocr.processing import load_processor
from wellocr.synthetic import make_sample

TOKEN = "hf_notARealTokenButLongEnough123"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def evaluated_run(trained_run_copy):
    """The trained run with a final evaluation and a cost ledger."""
    run = strip_results(trained_run_copy)
    (run / "eval" / "final").mkdir(parents=True)
    (run / "eval" / "final" / "metrics.json").write_text(json.dumps(
        {"cer": 0.123, "wer": 0.456, "fields": {"exact_match": 0.789}, "samples": 6, "split": "eval"}))
    ledger = CostLedger.open(run / "cost.json", CostConfig(hourly_rate=2.0), 1, 0, now=1e9, start=1e9, host="pod")
    ledger.heartbeat(8, now=1e9 + 1800, force=True)
    return run


def test_adapter_export_has_adapter_processor_and_card_only(evaluated_run, tmp_path, tiny_model_dir):
    out = E.export(evaluated_run, tmp_path / "export")

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", "README.md"} <= names
    assert not names & {"optimizer.pt", "trainer_state.json", "training_args.bin", "wellocr_complete.json"}
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (evaluated_run / "final" / "adapter_model.safetensors").read_bytes()
    load_processor(out)  # the processor files are complete


def test_model_card_has_front_matter_config_metrics_and_cost(evaluated_run, tmp_path, tiny_model_dir):
    card = (E.export(evaluated_run, tmp_path / "export") / "README.md").read_text()

    meta = front_matter(card)
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == "peft"
    assert meta["tags"] == ["wellocr", "qwen3-vl", "ocr", "well-logs"]
    metrics = card.split("## Metrics")[1].split("## Cost")[0]
    assert "| final | eval | 0.123 | 0.456 |" in metrics and "0.789" in metrics
    assert "$1.00 over 0.50 GPU-hours" in card.split("## Cost")[1]
    assert "| `lora.r` | `8` |" in card and "| `train.max_steps` | `8` |" in card
    assert "PeftModel.from_pretrained" in card.split("## How to load")[1]


def test_latest_checkpoint_export_takes_the_newest_checkpoint(trained_run, tmp_path):
    out = E.export(trained_run, tmp_path / "export", checkpoint="latest")
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (trained_run / "checkpoint-8" / "adapter_model.safetensors").read_bytes()
    assert "exported from `checkpoint-8` at step 8" in (out / "README.md").read_text()


def test_non_empty_out_dir_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert E.main(["--run", str(trained_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {out}: exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_directory_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert E.main(["--run", str(tmp_path), "--out", str(tmp_path / "export")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def _logits(model, processor):
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Transcribe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.fromarray(pixels)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_model_gives_the_logits_of_base_plus_adapter(trained_run, tmp_path):
    out = E.export(trained_run, tmp_path / "merged", merge=True)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert front_matter((out / "README.md").read_text())["library_name"] == "transformers"

    cfg = load_run_config(trained_run)
    backend = Backend("hf", "cpu", "test")
    with_adapter, processor = load_for_inference(cfg, backend, "fp32", trained_run / "final")
    base, _ = load_base_model(cfg, backend, "fp32")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()

    expected, merged_logits = _logits(with_adapter, processor), _logits(merged, load_processor(out))
    torch.testing.assert_close(merged_logits, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(_logits(base.eval(), processor), expected, atol=1e-4)  # the adapter does something


def test_merge_refuses_a_prequantised_base(trained_run, tmp_path, tiny_model_dir):
    quantised = tmp_path / "base-bnb-4bit"
    quantised.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="pre-quantised checkpoint.*--base-model"):
        E.export(trained_run, tmp_path / "merged", merge=True, base_model=str(quantised))
    assert not (tmp_path / "merged").exists()


def test_push_uploads_the_export_with_the_token_from_the_environment(trained_run_copy, tmp_path, monkeypatch):
    config = yaml.safe_load((trained_run_copy / "config.yaml").read_text())
    config["data"]["instruction"] = f"Read the header. {TOKEN}"  # a leaked secret the card would otherwise print
    config["data"]["dataset_name"] = str(tmp_path / "moved")  # unreadable now: the card shows data.instruction
    (trained_run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    calls = []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create_repo", self.token, repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", self.token, kw)))
    out = tmp_path / "export"

    assert E.main(["--run", str(trained_run_copy), "--out", str(out), "--push", "me/well-ocr", "--private"]) == 0

    assert calls[0] == ("create_repo", TOKEN, "me/well-ocr", {"private": True, "exist_ok": True, "repo_type": "model"})
    name, token, upload = calls[1]
    assert (name, token, upload["repo_id"], upload["folder_path"]) == ("upload_folder", TOKEN, "me/well-ocr", str(out))
    assert "Read the header. ***" in (out / "README.md").read_text()
    for file in out.rglob("*"):
        assert TOKEN.encode() not in file.read_bytes(), file


def test_push_without_hf_token_exits_2_before_any_work(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "export"
    assert E.main(["--run", str(trained_run), "--out", str(out), "--push", "me/well-ocr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push: HF_TOKEN is not set") and err.count("\n") == 1
    assert not out.exists()


def test_failed_upload_keeps_the_export_and_says_how_to_retry(trained_run, tmp_path, monkeypatch, capsys):
    def refuse(self, repo_id, **kw):
        raise OSError(f"401 Unauthorized for token {TOKEN}")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    out = tmp_path / "export"
    assert E.main(["--run", str(trained_run), "--out", str(out), "--push", "me/well-ocr"]) == 2
    err = capsys.readouterr().err
    assert "upload failed" in err and f"huggingface-cli upload me/well-ocr {out}" in err and TOKEN not in err
    assert (out / "adapter_model.safetensors").is_file()


def test_the_run_and_its_adapters_carry_the_projects_card_not_the_library_templates(trained_run):
    """TRL writes its template into the run directory and PEFT its own into every saved adapter; the trainer
    replaces both, before the completeness marker (which lists the card with its size)."""
    for where in (trained_run, trained_run / "final", trained_run / "checkpoint-8"):
        card = (where / "README.md").read_text()
        assert "More Information Needed" not in card and "fine-tuned version of" not in card, where
        assert card.startswith("---\n") and front_matter(card)["library_name"] == "peft"
        assert "# shared" in card and "| `lora.r` | `8` |" in card and "## Cost" in card
        assert "| 8 | " in card.split("During training")[1]  # the evaluation at step 8
    assert f'ADAPTER = "{trained_run / "checkpoint-8"}"' in (trained_run / "checkpoint-8" / "README.md").read_text()
    assert f'ADAPTER = "{trained_run / "final"}"' in (trained_run / "final" / "README.md").read_text()
    assert incomplete_reason(trained_run / "final") is None


def test_the_cards_how_to_load_runs_as_written_on_this_install(evaluated_run, tmp_path):
    """The snippet, cut from the exported card, in a fresh interpreter (torchvision absent beside the CPU torch):
    it loads the adapter and its processor and transcribes a scan."""
    out = E.export(evaluated_run, tmp_path / "export")
    card = (out / "README.md").read_text()
    snippet = card.split("## How to load")[1].split("```python\n")[1].split("```")[0]
    assert f'ADAPTER = "{out}"' in snippet and 'IMAGE = "header.png"' in snippet
    make_sample(seed=3, index=0, width=384)[0].save(tmp_path / "header.png")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
