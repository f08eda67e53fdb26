"""Composing a VLM from locally saved tiny backbones, and the connector-only `align` stage."""
from __future__ import annotations

import pytest
from helpers import tiny_overrides

from harness.pipeline import run_pipeline
from runtime.config import ComposeConfig, load_config
from runtime.errors import ConfigError
from stages.support import compose

LM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<end_of_utterance>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny SigLIP vision encoder and a tiny Llama LM (with tokenizer and chat template), saved locally the
    way hub checkpoints are laid out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from stages.support.synthetic import generate
    from stages.support.tinyvlm import train_tokenizer

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=64, patch_size=8)).save_pretrained(
        root / "vision")
    texts = [f"{r['question']} {r['multiple_choice_answer']}" for r in generate("shapes-vqa", 300, 0, 64)]
    tok = train_tokenizer(texts + ["user assistant"], 300)
    tok.chat_template = LM_TEMPLATE
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    bare = root / "lm_no_template"
    lm.save_pretrained(bare)
    tok.chat_template = None
    tok.save_pretrained(bare)
    return root


def _spec(backbones, **kw) -> ComposeConfig:
    return ComposeConfig(vision=str(backbones / "vision"), language=str(backbones / "lm"), **kw)


@pytest.mark.parametrize("connector, layers, in_width", [("mlp", [-1], 32), ("linear", [-1], 32),
                                                         ("mlp", [-2, -1], 64)])
def test_compose_llava(backbones, tmp_path, connector, layers, in_width):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = compose.build(_spec(backbones, connector=connector, vision_layers=layers), tmp_path / "m", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.model.multi_modal_projector.linear_1.in_features == in_width  # fusion widens the input
    assert model.config.projector_hidden_act == ("gelu" if connector == "mlp" else "linear")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What color?"}]}],
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<image>What color?")


def test_compose_pixel_shuffle(backbones, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = compose.build(_spec(backbones, connector="pixel_shuffle"), tmp_path / "m", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert model.model.connector.modality_projection.proj.in_features == 32 * 2 * 2


def test_backbone_weights_are_copied(backbones, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, LlamaForCausalLM, SiglipVisionModel

    out = compose.build(_spec(backbones), tmp_path / "m", seed=0)
    vlm = AutoModelForImageTextToText.from_pretrained(out)
    vision = SiglipVisionModel.from_pretrained(backbones / "vision")
    lm = LlamaForCausalLM.from_pretrained(backbones / "lm")
    assert torch.equal(vlm.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
                       vision.encoder.layers[0].mlp.fc1.weight)
    assert torch.equal(vlm.model.language_model.layers[1].self_attn.q_proj.weight,
                       lm.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("change, message", [
    ({"language": "lm_no_template"}, "has no chat template"),
    ({"vision": "lm"}, "unsupported architecture 'llama'"),
    ({"vision_layers": [5]}, "layer 5 does not exist"),
    ({"connector": "pixel_shuffle", "scale_factor": 3}, "not divisible by scale_factor 3"),
    ({"connector": "pixel_shuffle", "vision_layers": [-2, -1]}, "reads the last layer only"),
])
def test_incompatible_compositions_fail_at_config_time(backbones, change, message):
    fields = {"vision": str(backbones / "vision"), "language": str(backbones / "lm")}
    fields.update({k: str(backbones / v) if k in ("vision", "language") else v for k, v in change.items()})
    with pytest.raises(ConfigError, match=message):
        compose.check(ComposeConfig(**fields))


def test_align_pipeline_trains_only_the_connector(ray_session, workdir, backbones):
    from transformers import AutoModelForImageTextToText

    overrides = tiny_overrides(**{
        "model.source": "compose", "model.compose.vision": str(backbones / "vision"),
        "model.compose.language": str(backbones / "lm"), "model.compose.vision_layers": "[-2, -1]",
        "align.max_steps": 12, "align.batch_size": 8, "align.learning_rate": 5e-3, "align.save_steps": 6,
        "align.logging_steps": 1, "align.warmup_steps": 0})
    result = run_pipeline(load_config(None, overrides), "align")
    assert [s["name"] for s in result["stages"]] == ["data", "model", "align", "sft", "eval"]
    m = result["metrics"]
    base = AutoModelForImageTextToText.from_pretrained(workdir / "runs" / result["run_id"] / "model" / "model")
    connector = sum(p.numel() for n, p in base.named_parameters() if "multi_modal_projector" in n)
    assert m["align/trainable_params"] == connector == m["align/trainable_params_connector"]
    assert m["align/loss_end"] < m["align/loss_start"]
    assert "eval/vqa_accuracy" in m and "eval/align_vqa_accuracy" in m
    assert m["sft/trainable_params"] > connector  # sft trains everything again
