"""Builds the published SmolVLM architectures of runtime/architectures.py with random weights: the exact Idefics3
model, its image processing, a tokenizer of the published length with the special tokens at their published ids, and
the published chat template. Only the weights (seeded) and the ordinary BPE tokens (trained on the run's own text)
differ from the checkpoint."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from runtime.architectures import Architecture

# The published chat template (chat_template.json of all three); rendered the same for list contents as the tiny
# model's, which also takes a plain string content.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BASE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's ids 0, 1, 2
TEMPLATE_TEXT = ["User:", "Assistant:", "User: ", "Assistant: ", "\n"]


def model_config(arch: Architecture, text_layers: int | None = None, vision_layers: int | None = None):
    """The checkpoint's Idefics3Config (fp32); ``*_layers`` shorten a tower (the memory plan's traced steps)."""
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = dict(arch.vision) | ({"num_hidden_layers": vision_layers} if vision_layers is not None else {})
    text = dict(arch.text, tie_word_embeddings=False) | (
        {"num_hidden_layers": text_layers} if text_layers is not None else {})
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision).to_dict(), text_config=LlamaConfig(**text).to_dict(),
        scale_factor=arch.scale_factor, image_token_id=arch.special_ids["<image>"], tie_word_embeddings=False,
        pad_token_id=arch.text["pad_token_id"], dtype="float32")


def train_tokenizer(arch: Architecture, texts: Iterable[str], bpe_size: int = 1000):
    """A byte-level BPE (SmolLM2's kind) trained on ``texts``, padded to the published length: SmolLM2's special
    tokens at 0-2, filler tokens that no text produces up to the base vocabulary, then the VLM's tokens at their
    published ids; bos/eos/pad/unk and the chat template as published."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, special_tokens=list(BASE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + TEMPLATE_TEXT * 50, trainer=trainer)
    by_id = {i: token for token, i in arch.special_ids.items()}
    start = tok.get_vocab_size()  # added tokens take the next ids, in order: one list fills every id up to the end
    tok.add_special_tokens([AddedToken(by_id.get(i, f"<|vlmlab_unused_{i}|>"), special=True)
                            for i in range(start, arch.vocab_size)])
    assert all(tok.token_to_id(token) == i for i, token in by_id.items()), "special tokens off their published ids"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def processor(arch: Architecture, tokenizer, longest_edge: int | None = None):
    """The checkpoint's Idefics3 processor: images resized to ``longest_edge`` (default the published one), split
    into tiles of ``arch.tile`` pixels plus a global view, ``image_seq_len`` tokens each."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge or arch.longest_edge}, max_image_size={"longest_edge": arch.tile},
        do_image_splitting=True, do_resize=True, resample=1, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=arch.image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def parameter_count(arch: Architecture) -> int:
    """The architecture's parameters, counted on the meta device (no memory, no weights)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(model_config(arch))
    return sum(p.numel() for p in model.parameters())


def save_shell(arch: Architecture, texts: Iterable[str], out_dir: Path, longest_edge: int | None = None) -> Path:
    """config.json, the processor and the tokenizer, without weights: what the memory plan builds its shortened
    models from."""
    tokenizer = train_tokenizer(arch, texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config(arch).save_pretrained(out_dir)
    processor(arch, tokenizer, longest_edge).save_pretrained(out_dir)
    return out_dir


def build(arch: Architecture, texts: Iterable[str], seed: int, out_dir: Path, longest_edge: int | None = None) -> Path:
    """The architecture with seeded random weights, its processor and tokenizer, saved as a Hugging Face
    checkpoint (fp32 safetensors) in ``out_dir``."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    tokenizer = train_tokenizer(arch, texts)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(model_config(arch))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor(arch, tokenizer, longest_edge).save_pretrained(out_dir)
    return out_dir
