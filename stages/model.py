"""Stage `model`: the base checkpoint every later stage starts from.

`model.source: tiny` builds the tiny Idefics3 VLM (tokenizer trained on this run's training text), `random` a published
architecture (runtime/architectures.py) with seeded random weights, `compose` a VLM from two backbones; anything else
must be a local directory or hub id of an `AutoModelForImageTextToText` checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path

from runtime.architectures import architecture
from runtime.errors import ConfigError, UserError
from runtime.manifest import sha256_file
from stages import StageContext, StageOutput
from stages.support import compose, smolvlm, tinyvlm

CONFIG_KEYS = ("seed", "model", "data.image_size")
SOURCE_KEYS = ("model.source", "model.compose.vision", "model.compose.language")


def check(cfg) -> None:
    source = cfg.model.source
    if source == "compose":
        compose.check(cfg.model.compose, cfg.model.trust_remote_code)
        return
    if source == "random":
        arch = architecture(cfg.model.architecture)
        edge = cfg.model.image_longest_edge
        if edge is not None and edge % arch.tile:
            raise ConfigError(f"model.image_longest_edge: {edge} is not a multiple of {arch.name}'s {arch.tile}-pixel "
                              f"tile (images are cut into whole tiles); use {arch.tile * max(1, edge // arch.tile)} or "
                              f"{arch.tile * (edge // arch.tile + 1)}")
        return
    if source == "tiny":
        t = cfg.model.tiny
        if cfg.data.image_size % t.patch_size or (cfg.data.image_size // t.patch_size) % t.scale_factor:
            raise ConfigError("model.tiny: data.image_size must be a multiple of patch_size * scale_factor "
                              f"(got {cfg.data.image_size}, {t.patch_size}, {t.scale_factor})")
        for side in ("vision", "text"):
            if getattr(t, f"{side}_hidden") % getattr(t, f"{side}_heads"):
                raise ConfigError(f"model.tiny.{side}_hidden must be divisible by model.tiny.{side}_heads")
        return
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.source: {path} has no config.json (not a Hugging Face checkpoint)")
        check_config(path, cfg.model.trust_remote_code)
        check_weights(path)
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ConfigError(f"model.source: {source} is neither a directory here nor a hub id (owner/name); give a "
                          "checkpoint directory, a hub id, tiny, random or compose")
    elif hub_offline() and not in_hub_cache(source, cfg.model.revision):
        raise ConfigError(f"model.source: {source} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                          "download it first (huggingface-cli download) or unset HF_HUB_OFFLINE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself reads it (the switch its downloads obey)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """The hub checkpoint's config.json is in the local cache (what an offline run can load)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def check_config(path: Path, trust_remote_code: bool) -> None:
    """The checkpoint's config.json loads as a transformers config (what every later stage builds the model from)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # JSON, unknown model_type, remote code refused: the library's own words
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.source: {path / 'config.json'} does not load ({first}); give a Hugging Face "
                          "checkpoint directory") from None


def check_weights(path: Path) -> None:
    """Every safetensors shard present (per the index) and with a readable header; no pickle weights."""
    import json

    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"model.source: {index} is not a safetensors index (a 'weight_map' of names to shard "
                            "files); restore it or re-save the checkpoint") from None
        for name in names:
            if not (path / name).is_file():
                raise UserError(f"model.source: shard {path / name} listed in {index.name} is missing")
        shards = [path / n for n in names]
    if not shards:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {pickles}: convert them to safetensors)" if pickles else ""
        raise UserError(f"model.source: no *.safetensors weights in {path}{hint}")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:
            raise UserError(f"model.source: {shard} is not a valid safetensors file ({exc})") from None


def weights_hash(model_dir: Path) -> str | None:
    files = sorted(model_dir.glob("*.safetensors"))
    return sha256_file(files[0]) if len(files) == 1 else None


def _training_text(ctx: StageContext) -> list[str]:
    import pyarrow.parquet as pq

    texts = []
    for task in ctx.latest("tasks").values():
        table = pq.read_table(task["train"], columns=["question", "answer"])
        texts += [f"{q} {a}" for q, a in zip(table["question"].to_pylist(), table["answer"].to_pylist(), strict=False)]
    return texts


def run(ctx: StageContext) -> StageOutput:

    cfg = ctx.cfg
    if cfg.model.source == "tiny":
        model_dir = tinyvlm.build(_training_text(ctx), cfg.model.tiny, cfg.data.image_size, cfg.seed,
                                  ctx.stage_dir / "model")
        source = "tiny"
    elif cfg.model.source == "random":
        arch = architecture(cfg.model.architecture)
        model_dir = smolvlm.build(arch, _training_text(ctx), cfg.seed, ctx.stage_dir / "model",
                                  cfg.model.image_longest_edge)
        source = f"random:{arch.name}"
    elif cfg.model.source == "compose":

        spec = cfg.model.compose
        model_dir = compose.build(spec, ctx.stage_dir / "model", cfg.seed, cfg.model.trust_remote_code)
        source = f"compose:{spec.vision}+{spec.language}:{spec.connector}"
    else:
        model_dir = Path(cfg.model.source).expanduser()
        source = cfg.model.source
        if not model_dir.exists():  # a hub id: resolve to the local cache (no download when HF_HUB_OFFLINE=1)
            from huggingface_hub import snapshot_download
            try:
                model_dir = Path(snapshot_download(source, revision=cfg.model.revision))
            except Exception as exc:
                raise UserError(f"model.source: cannot fetch '{source}': {exc}") from None
    from transformers import AutoConfig

    try:
        n_params = _count_params(model_dir)
        AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.source: {model_dir} is not a loadable checkpoint: {exc}") from None
    return StageOutput(
        metrics={"model/parameters": n_params},
        outputs={"model_dir": str(model_dir), "model_source": source, "weights_sha256": weights_hash(model_dir)},
    )


def _count_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise OSError(f"no *.safetensors weights in {model_dir}")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            total += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return total
