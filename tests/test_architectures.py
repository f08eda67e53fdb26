"""The published SmolVLM architectures built with random weights (issue #33): their parameter counts, tokenizers and
image processing match the checkpoints they stand for (runtime/architectures.py names the sources)."""
from __future__ import annotations

import pytest
from PIL import Image

from runtime.architectures import ARCHITECTURES, architecture
from stages.support import smolvlm
from stages.support.training import assistant_turn, user_turn

TEXTS = ["what color is the circle", "how many bars are there", "red", "3"] * 20


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_count_within_one_percent_of_the_published_checkpoint(name):
    arch = architecture(name)
    count = smolvlm.parameter_count(arch)  # on the meta device: no memory, no weights
    assert abs(count / arch.published_parameters - 1) < 0.01, (name, count, arch.published_parameters)
    if name == "smolvlm-256m":  # the one whose safetensors' tensors were summed: exact
        assert count == 256_484_928


def test_the_256m_tokenizer_and_processor_are_the_published_ones():
    arch = architecture("smolvlm-256m")
    tok = smolvlm.train_tokenizer(arch, TEXTS)
    assert len(tok) == arch.vocab_size == 49280
    published = {"<global-img>": 49152, "<row_1_col_1>": 49153, "<row_6_col_6>": 49188,
                 "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279,
                 "<|im_start|>": 1, "<|im_end|>": 2}
    assert {t: tok.convert_tokens_to_ids(t) for t in published} == published
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 49279, 2)
    processor = smolvlm.processor(arch, tok, longest_edge=1024)  # a 2x2 grid of 512-pixel tiles
    text = processor.apply_chat_template(user_turn("what color is the circle") + assistant_turn("red"))
    assert text == ("<|im_start|>User:<image>what color is the circle<end_of_utterance>\n"
                    "Assistant: red<end_of_utterance>\n")
    batch = processor(text=text, images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 5, 3, 512, 512)  # 4 tiles and the global view
    assert int((batch["input_ids"] == 49190).sum()) == 5 * arch.image_seq_len == 320
    full = smolvlm.processor(arch, tok)  # the published 2048: 4x4 tiles + global, 1088 image tokens
    assert int((full(text=text, images=[Image.new("RGB", (64, 64))], return_tensors="pt")["input_ids"]
                == 49190).sum()) == 17 * 64


def test_the_chat_template_renders_as_the_tiny_models_for_list_contents():
    from stages.support import tinyvlm

    arch = architecture("smolvlm-256m")
    tok = smolvlm.train_tokenizer(arch, TEXTS)
    tiny = tinyvlm.train_tokenizer(TEXTS, 300)
    messages = user_turn("q?") + assistant_turn("a")
    for generation_prompt in (False, True):
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == \
            tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_random_source_needs_an_architecture_and_a_whole_tile_edge():
    from runtime.config import load_config
    from runtime.errors import ConfigError
    from stages import STAGES

    with pytest.raises(ConfigError, match="model.architecture is not set"):
        load_config(None, ["model.source=random"])
    with pytest.raises(ConfigError, match="is for model.source: random"):
        load_config(None, ["model.architecture=smolvlm-256m"])
    cfg = load_config(None, ["model.source=random", "model.architecture=smolvlm-256m", "model.image_longest_edge=1000"])
    with pytest.raises(ConfigError, match="not a multiple of smolvlm-256m's 512-pixel tile"):
        STAGES["model"].check(cfg)
