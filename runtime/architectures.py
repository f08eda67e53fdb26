"""The published SmolVLM architectures (`model.source: random`, `model.architecture`): one table, its sources.

One entry per checkpoint, each value with its source; stages/support/smolvlm.py builds them. A built model has the
checkpoint's exact Idefics3 architecture (vision encoder, pixel-shuffle connector, Llama decoder, untied LM head), the
same image processing (image splitting into tiles of ``tile`` pixels, a global view, ``image_seq_len`` tokens per
tile), a tokenizer of the published length whose special tokens sit at the published ids, and the published chat
template. Only the weights (seeded, random) and the ordinary BPE tokens (trained here on the run's own text) differ, so
memory, FLOPs and time of every stage are those of the real model, with nothing to download.

Sources (read 2026-12, see docs/architectures.md for the full trail):
* SmolVLM-256M-Instruct: the published config.json, preprocessor_config.json, processor_config.json and
  tokenizer_config.json of revision 7e3e67ed, as vendored byte for byte in GitHub xi-ix/smolvlm_256m_ft @ 0c7b2de5
  (SmolVLM-256M-Instruct/); parameters 256,484,928 (the sum of its safetensors' tensors: 513,028,808 bytes bf16).
* SmolVLM-500M-Instruct: the model card (SmolLM2-360M-Instruct + google/siglip-base-patch16-512, 64 tokens per 512 px
  tile), vidore/ColSmolVLM-Instruct-500M-base's config.json (derived from the same checkpoint: 960/2560, 15 heads,
  5 KV heads, scale 4, image token 49190), SmolLM2-360M's config (32 layers, rope_theta 1e5); "507M params".
* SmolVLM-Instruct (2.2B): its config.json head (scale 3, image token 49153, 2048/8192, 24 layers, max position 16384,
  rope_theta 273768), processor_config.json (image_seq_len 81), preprocessor_config.json (384 / 1536),
  added_tokens.json (49152-49154); the vision tower is google/siglip-so400m-patch14-384 (1152 wide, 27 layers,
  MLP 4304, 16 heads); "2.25B params". The SmolVLM paper: arXiv 2504.05299.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE_VOCAB = 49152  # SmolLM2's BPE vocabulary: the VLM's own tokens come after it


@dataclass(frozen=True)
class Architecture:
    name: str
    checkpoint: str  # the hub id it reproduces
    vision: dict  # Idefics3VisionConfig fields
    text: dict  # LlamaConfig fields
    scale_factor: int  # pixel shuffle: scale_factor^2 patches per image token
    image_seq_len: int  # image tokens per tile: (image_size / patch_size)^2 / scale_factor^2
    longest_edge: int  # the processor's resize target: a 4x4 grid of tiles by default
    tile: int  # max_image_size.longest_edge: one tile's side (the vision encoder's image_size)
    special_ids: dict  # token -> its published id
    published_parameters: int
    rows_cols_are_tokens: bool = True  # <global-img>, <row_i_col_j> single tokens (256M, 500M), strings (2.2B)

    @property
    def vocab_size(self) -> int:
        return self.text["vocab_size"]

    def grid(self, longest_edge: int | None = None) -> int:
        """Tiles per side of a square image at ``longest_edge`` (the global view comes on top)."""
        edge = longest_edge or self.longest_edge
        return -(-edge // self.tile)


def _vlm_tokens(reserved_up_to: int, end_of_utterance: int) -> dict[str, int]:
    """256M / 500M: <global-img>, the 36 <row_i_col_j>, <fake_token_around_image>, <image>, reserved, <end_of_utterance>
    (added_tokens.json of SmolVLM-256M-Instruct)."""
    ids = {"<global-img>": BASE_VOCAB}
    ids |= {f"<row_{r}_col_{c}>": BASE_VOCAB + (r - 1) * 6 + c for r in range(1, 7) for c in range(1, 7)}
    ids |= {"<fake_token_around_image>": BASE_VOCAB + 37, "<image>": BASE_VOCAB + 38}
    ids |= {f"<|reserved_special_token_{i}|>": BASE_VOCAB + 39 + i for i in range(reserved_up_to - BASE_VOCAB - 39)}
    ids["<end_of_utterance>"] = end_of_utterance
    return ids


SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "patch_size": 16, "image_size": 512, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(
        name="smolvlm-256m", checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct", vision=SIGLIP_B16_512,
        text={"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0,
              "rms_norm_eps": 1e-5, "vocab_size": 49280, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
        scale_factor=4, image_seq_len=64, longest_edge=2048, tile=512,
        special_ids=_vlm_tokens(49279, 49279), published_parameters=256_484_928),
    Architecture(
        name="smolvlm-500m", checkpoint="HuggingFaceTB/SmolVLM-500M-Instruct", vision=SIGLIP_B16_512,
        text={"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
              "num_key_value_heads": 5, "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0,
              "rms_norm_eps": 1e-5, "vocab_size": 49280, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
        scale_factor=4, image_seq_len=64, longest_edge=2048, tile=512,
        special_ids=_vlm_tokens(49279, 49279), published_parameters=507_000_000),
    Architecture(
        name="smolvlm-2.2b", checkpoint="HuggingFaceTB/SmolVLM-Instruct",
        vision={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 384, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
        text={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
              "num_key_value_heads": 32, "head_dim": 64, "max_position_embeddings": 16384, "rope_theta": 273768.0,
              "rms_norm_eps": 1e-5, "vocab_size": 49155, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 2},
        scale_factor=3, image_seq_len=81, longest_edge=1536, tile=384,
        special_ids={"<fake_token_around_image>": 49152, "<image>": 49153, "<end_of_utterance>": 49154},
        published_parameters=2_250_000_000, rows_cols_are_tokens=False),
)}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}' (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


