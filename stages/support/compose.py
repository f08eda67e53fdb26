"""Compose a VLM from a pretrained vision encoder and a pretrained language model (MODA / LLaVA recipe).

* ``connector: linear | mlp`` -> LLaVA architecture (projector: 2 linear layers, identity or GELU between);
  ``vision_layers`` with several entries concatenates those layers' features (multi-level fusion), which widens
  the projector's input.
* ``connector: pixel_shuffle`` -> Idefics3 / SmolVLM architecture (pixel-shuffle + linear, last vision layer).

Backbone weights are copied into the composed model; the connector starts from random init. The tokenizer is
the language model's plus an ``<image>`` token, and the processor's chat template wraps the LM's own template so
image parts render as ``<image>``. Saved in standard Hugging Face layout.
"""
from __future__ import annotations

from pathlib import Path

from runtime.errors import ConfigError

VISION_TYPES = {"siglip_vision_model", "siglip", "clip_vision_model", "clip"}
PIXEL_SHUFFLE_TEXT = {"llama"}  # Idefics3's text model is a Llama

# Renders multimodal content lists as text with "<image>" placeholders, then runs the LM's own template.
FLATTEN_CONTENT = (
    "{%- set flat = namespace(items=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set flat.items = flat.items + [m] -%}{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for part in m['content'] -%}{%- if part['type'] == 'image' -%}{%- set text.v = text.v + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set flat.items = flat.items + [{'role': m['role'], 'content': text.v}] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = flat.items -%}"
)


def _vision_config(path: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type in ("siglip", "clip"):
        cfg = cfg.vision_config
    return cfg


def check(compose, trust_remote_code: bool = False) -> None:
    """Config-time compatibility checks; raises ConfigError naming the problem."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        vision = _vision_config(compose.vision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.compose.vision: cannot read {compose.vision}: {exc}") from None
    if vision.model_type not in VISION_TYPES:
        raise ConfigError(f"model.compose.vision: unsupported architecture '{vision.model_type}' "
                          f"(supported: {', '.join(sorted(VISION_TYPES))})")
    try:
        text = AutoConfig.from_pretrained(compose.language, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(compose.language, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.compose.language: cannot read {compose.language}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.compose.language: {compose.language} has no chat template (a VLM needs one to "
                          "format image + question turns)")
    layers = vision.num_hidden_layers
    for layer in compose.vision_layers:
        if not -layers <= layer < layers:
            raise ConfigError(f"model.compose.vision_layers: layer {layer} does not exist (the encoder has "
                              f"{layers} layers)")
    if compose.connector == "pixel_shuffle":
        if not vision.model_type.startswith("siglip"):
            raise ConfigError(f"model.compose: connector pixel_shuffle (Idefics3) needs a SigLIP encoder "
                              f"(got '{vision.model_type}'); use connector mlp or linear")
        if text.model_type not in PIXEL_SHUFFLE_TEXT:
            raise ConfigError(f"model.compose: connector pixel_shuffle builds an Idefics3 model, whose language "
                              f"model must be Llama (got '{text.model_type}'); use connector mlp or linear")
        if compose.vision_layers != [-1]:
            raise ConfigError("model.compose.vision_layers: pixel_shuffle (Idefics3) reads the last layer only")
        grid = vision.image_size // vision.patch_size
        if grid % compose.scale_factor:
            raise ConfigError(f"model.compose.scale_factor: the vision patch grid ({grid}x{grid}) is not divisible "
                              f"by scale_factor {compose.scale_factor}, so pixel shuffle cannot bridge it")


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build(compose, out_dir: Path, seed: int, trust_remote_code: bool = False) -> Path:
    """Compose, copy backbone weights, save model + processor into ``out_dir``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    check(compose, trust_remote_code)
    pixel_shuffle = compose.connector == "pixel_shuffle"
    vision_cfg = _vision_config(compose.vision)
    tokenizer = AutoTokenizer.from_pretrained(compose.language, trust_remote_code=trust_remote_code)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *(IDEFICS3_TOKENS if pixel_shuffle
                                                                             else [])]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(compose.language, trust_remote_code=trust_remote_code,
                                              use_safetensors=True)
    lm.resize_token_embeddings(len(tokenizer))
    encoder = AutoModel.from_pretrained(compose.vision, use_safetensors=True)
    if hasattr(encoder, "text_model"):  # a full SigLIP/CLIP checkpoint: keep its vision half
        encoder = encoder.vision_model
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if pixel_shuffle:
        model, processor = _idefics3(compose, vision_cfg, lm, tokenizer, image_token_id)
        target, text = model.model.vision_model, model.model.text_model
    else:
        model, processor = _llava(compose, vision_cfg, lm, tokenizer, image_token_id)
        target, text = model.model.vision_tower, model.model.language_model
    missing, _ = target.load_state_dict(encoder.state_dict(), strict=False)  # SigLIP's pooling head is unused
    if missing:
        raise ConfigError(f"model.compose.vision: {compose.vision} lacks weights the encoder needs: {missing[:5]}")
    text.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _template(tokenizer) -> str:
    return FLATTEN_CONTENT + tokenizer.chat_template


def _image_processor(vision_cfg, pixel_shuffle: bool):
    from transformers import Idefics3ImageProcessorPil, SiglipImageProcessorPil

    size = vision_cfg.image_size
    if pixel_shuffle:
        return Idefics3ImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": size},
                                         do_image_splitting=False)
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def _llava(compose, vision_cfg, lm, tokenizer, image_token_id):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    layers = compose.vision_layers
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict() | {"model_type": vision_cfg.model_type}, text_config=lm.config.to_dict(),
        image_token_index=image_token_id, vision_feature_select_strategy="full",
        vision_feature_layer=layers[0] if len(layers) == 1 else list(layers),
        projector_hidden_act="gelu" if compose.connector == "mlp" else "linear",
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2, tie_word_embeddings=False)
    tokenizer.image_token = "<image>"
    processor = LlavaProcessor(image_processor=_image_processor(vision_cfg, False), tokenizer=tokenizer,
                               patch_size=vision_cfg.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=_template(tokenizer))
    return LlavaForConditionalGeneration(config), processor


def _idefics3(compose, vision_cfg, lm, tokenizer, image_token_id):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    vision = {k: getattr(vision_cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "image_size", "patch_size")}
    config = Idefics3Config(vision_config=vision, text_config=lm.config.to_dict(), scale_factor=compose.scale_factor,
                            image_token_id=image_token_id, tie_word_embeddings=False)
    seq = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 // compose.scale_factor**2
    processor = Idefics3Processor(image_processor=_image_processor(vision_cfg, True), tokenizer=tokenizer,
                                  image_seq_len=seq, chat_template=_template(tokenizer))
    return Idefics3ForConditionalGeneration(config), processor
