"""The offline tiny Qwen3-VL and the processor loader: what the CPU smoke run and the data scan rely on."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, Qwen3VLForConditionalGeneration

from wellocr import tiny
from wellocr.errors import UserError
from wellocr.processing import count_image_tokens, load_processor
from wellocr.tiny import build_tiny_model, qwen3vl_config, train_tokenizer

PROMPT = "Transcribe the header fields."
PATCH_BLOCK = 32 * 32  # pixels per visual token: patch 16, merge 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def processor(model_dir):
    return load_processor(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForImageTextToText.from_pretrained(model_dir)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _image(width, height):
    return Image.new("RGB", (width, height), "white")


def _prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _inputs(processor, width=300, height=200):
    return processor(images=[_image(width, height)], text=[_prompt(processor)], return_tensors="pt")


def _image_pad_count(processor, inputs):
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def test_same_seed_gives_identical_weights(model_dir, tmp_path):
    again = _weights(build_tiny_model(tmp_path / "again", seed=0))
    first = _weights(model_dir)
    assert again.keys() == first.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_different_seed_gives_different_weights(model_dir, tmp_path):
    other = _weights(build_tiny_model(tmp_path / "other", seed=1))
    first = _weights(model_dir)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_complete_build_is_returned_unchanged(model_dir):
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(model_dir, seed=0) == model_dir
    assert weights.stat().st_mtime_ns == before


def test_build_with_other_seed_refuses_existing_dir(model_dir):
    with pytest.raises(UserError, match="seed 0"):
        build_tiny_model(model_dir, seed=1)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def write_then_die(out, arch, seed):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_write_build", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_unknown_arch_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="qwen3-vl-2b"):
        build_tiny_model(tmp_path / "model", arch="qwen3-vl-200b")


def test_model_reloads_with_auto_class(model):
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_config_token_ids_match_tokenizer(model, processor):
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    cfg = model.config
    assert (cfg.image_token_id, cfg.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids("<|vision_start|>"), ids("<|vision_end|>"))
    assert (cfg.text_config.eos_token_id, tok.eos_token_id) == (ids("<|im_end|>"),) * 2
    assert (cfg.text_config.pad_token_id, tok.pad_token_id) == (ids("<|endoftext|>"),) * 2
    assert model.generation_config.eos_token_id == ids("<|im_end|>")



def test_the_trainer_finds_no_special_tokens_to_align(model_dir, processor):
    """The Trainer aligns the model's and generation config's PAD/BOS/EOS with the tokenizer's and warns ("The
    tokenizer has new PAD/BOS/EOS tokens ...") when they differ: the tiny model gives it nothing to change."""
    from transformers.testing_utils import CaptureLogger
    from transformers.trainer_utils import align_special_tokens
    from transformers.trainer_utils import logger as trainer_logger

    fresh = AutoModelForImageTextToText.from_pretrained(model_dir)
    before = fresh.config.to_dict()
    with CaptureLogger(trainer_logger) as captured:
        align_special_tokens(fresh, processor)
    assert "PAD/BOS/EOS" not in captured.out
    assert fresh.config.to_dict() == before
    tok, generation = processor.tokenizer, fresh.generation_config  # eos comes back as a list: the Trainer's form
    assert generation.bos_token_id is None
    assert (generation.eos_token_id, generation.pad_token_id) == ([tok.eos_token_id], tok.pad_token_id)

def test_special_tokens_follow_the_bpe_vocab_in_qwen_order(processor):
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == len(processor.tokenizer) - 1


def test_chat_template_renders_image_and_generation_prompt(processor):
    text = _prompt(processor)
    assert "<|vision_start|><|image_pad|><|vision_end|>" + PROMPT in text
    assert text.endswith("<|im_start|>assistant\n")


def test_processor_expands_image_to_grid_tokens(processor):
    inputs = _inputs(processor)
    grid = inputs["image_grid_thw"]
    assert _image_pad_count(processor, inputs) == int(grid.prod()) // 4 > 0


def test_processor_marks_image_tokens_in_mm_token_type_ids(processor):
    inputs = _inputs(processor)
    is_image = inputs["input_ids"] == processor.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"] == 1, is_image)


@pytest.mark.parametrize("width,height", [(20, 20), (300, 200), (640, 480), (2550, 3300), (1700, 90), (33, 1000)])
def test_count_image_tokens_matches_processor(processor, width, height):
    inputs = _inputs(processor, width, height)
    assert count_image_tokens(processor, width, height) == _image_pad_count(processor, inputs)


def test_pixel_budget_caps_visual_tokens(model_dir):
    budget = load_processor(model_dir, min_pixels=4 * PATCH_BLOCK, max_pixels=20 * PATCH_BLOCK)
    inputs = _inputs(budget, 2550, 3300)
    assert 15 <= _image_pad_count(budget, inputs) <= 20


def test_pixel_budget_raises_small_images_to_the_minimum(model_dir):
    budget = load_processor(model_dir, min_pixels=16 * PATCH_BLOCK, max_pixels=64 * PATCH_BLOCK)
    assert count_image_tokens(budget, 40, 30) >= 16


def test_inverted_pixel_budget_is_a_user_error(model_dir):
    with pytest.raises(UserError, match="min_pixels"):
        load_processor(model_dir, min_pixels=64 * PATCH_BLOCK, max_pixels=4 * PATCH_BLOCK)


def test_tokenizer_round_trips_api_line(processor):
    line = "API: 42-501-20130-00-00"
    tok = processor.tokenizer
    ids = tok(line, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == line
    assert tok.unk_token_id not in ids


def test_generate_runs_on_cpu(model, processor):
    inputs = _inputs(processor)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_processor_save_and_reload_round_trips(model_dir, tmp_path):
    budget = load_processor(model_dir, min_pixels=4 * PATCH_BLOCK, max_pixels=12 * PATCH_BLOCK)
    budget.save_pretrained(tmp_path)
    reloaded = load_processor(tmp_path)
    expected, got = _inputs(budget, 900, 700), _inputs(reloaded, 900, 700)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert reloaded.chat_template == budget.chat_template


def test_saved_processor_names_the_stock_class(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "tokenizer_config.json", "video_preprocessor_config.json"):
        assert json.loads((tmp_path / name).read_text())["processor_class"] == "Qwen3VLProcessor"


def test_loads_a_checkpoint_laid_out_like_the_hub(model_dir, tmp_path):
    """Hub Qwen3-VL repos keep the image processor in preprocessor_config.json and the template in JSON."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    image_cfg = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
    image_cfg.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    template = (model_dir / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = load_processor(tmp_path)
    assert loaded.chat_template == template
    assert _image_pad_count(loaded, _inputs(loaded)) == count_image_tokens(loaded, 300, 200)


def test_2b_architecture_has_2_1b_parameters():
    cfg = qwen3vl_config("qwen3-vl-2b", train_tokenizer())
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2_127_532_032, rel=0.01)


@pytest.mark.parametrize("width,height", [(2550, 3300), (1024, 723), (300, 200), (1700, 90), (40, 30)])
def test_decoded_images_already_have_the_processor_size(model_dir, width, height):
    """wellocr.data resizes once, straight to the processor's grid, so the processor does not resize again, and
    the visual-token count the data scan predicts is the one the processor produces."""
    import base64
    import io

    from wellocr.data import decode_image, fit_to_pixel_budget

    lo, hi = 4 * PATCH_BLOCK, 64 * PATCH_BLOCK
    budget = load_processor(model_dir, min_pixels=lo, max_pixels=hi)
    buffer = io.BytesIO()
    _image(width, height).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    image = decode_image(encoded, lo, hi)
    inputs = _inputs(budget, *image.size)
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    assert (grid_w * 16, grid_h * 16) == image.size  # the processor kept the decoded size
    assert _image_pad_count(budget, inputs) == count_image_tokens(budget, *fit_to_pixel_budget(width, height, lo, hi))
