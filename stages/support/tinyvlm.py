"""A tiny Idefics3-architecture VLM (SigLIP-style encoder + pixel-shuffle connector + Llama), built from config.

The tokenizer is a byte-level BPE trained locally on the task text, so nothing touches the hub. The result is
saved in standard Hugging Face layout (model + processor in one directory), exactly like a hub checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# SmolVLM's chat template: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<end_of_utterance>", "<image>",
                  "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
TEMPLATE_TEXT = ["User:", "Assistant:", "User: ", "Assistant: ", "\n"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer over ``texts`` with the Idefics3 special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + TEMPLATE_TEXT * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>",
        unk_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(cfg, image_size: int, vocab_size: int, pad_id: int = 1, bos_id: int = 2, eos_id: int = 3,
                 image_token_id: int = 4):
    """The Idefics3Config of the tiny model (SigLIP-style vision, pixel-shuffle connector, tied Llama)."""
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = Idefics3VisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 4, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=image_size, patch_size=cfg.patch_size)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=bos_id,
        eos_token_id=eos_id)
    return Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=cfg.scale_factor,
                          image_token_id=image_token_id, tie_word_embeddings=True, pad_token_id=pad_id)


def build(texts: Iterable[str], cfg, image_size: int, seed: int, out_dir: Path) -> Path:
    """Build and save the tiny VLM described by ``cfg`` (a TinyModelConfig) into ``out_dir``."""
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    config = model_config(cfg, image_size, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                          bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_seq_len = (image_size // cfg.patch_size) ** 2 // cfg.scale_factor**2
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False,
        do_resize=True, resample=3)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
