"""The model users run, through every stage (issue #33): the T4 preset's `dpo` pipeline on SmolVLM-256M's exact
architecture (random weights, nothing downloaded), synthetic data, on this CPU at batch 1 with image splitting on at a
2x2 grid (4 tiles of 512 px and the global view: 320 image tokens a sample), test step counts."""
from __future__ import annotations

import json

from transformers import AutoConfig, AutoProcessor

from harness.pipeline import run_pipeline
from runtime.config import load_config

REAL_SHAPES = [
    "model.source=random", "model.architecture=smolvlm-256m", "model.image_longest_edge=1024",
    "data.tasks.vqa.source=synthetic", "data.tasks.vqa.train_size=8", "data.tasks.vqa.test_size=2",
    "data.tasks.chartqa=null", "data.image_size=64",
    "resources.use_gpu=false", "resources.cpus_per_worker=2", "cost.price_per_hour=null",
    *(f"{stage}.{key}" for stage in ("sft", "dpo") for key in (
        "max_steps=1", "batch_size=1", "gradient_accumulation_steps=1", "save_steps=1", "warmup_steps=0",
        "logging_steps=1", "precision=auto")),  # the preset's fp16 is the T4's; this CPU runs fp32
    "dpo.preference.size=1",  # one on-policy answer generated, at the real prompt length
    "eval.batch_size=1", "eval.limit=1", "eval.score_base=false",
]


def test_smolvlm_256m_sft_dpo_eval_at_a_2x2_grid(ray_session, workdir):
    cfg = load_config("smolvlm-256m-t4", REAL_SHAPES)
    assert cfg.eval.protocol == "lmms" and cfg.sft.lora.enabled and cfg.dpo.preference.rejected == "on_policy"
    result = run_pipeline(cfg, "dpo")
    m = result["metrics"]
    assert m["model/parameters"] == 256_484_928  # the published checkpoint's count
    assert m["sft/steps"] == 1 and m["dpo/steps"] == 1 and m["dpo/pairs"] == 1
    assert 0.0 <= m["eval/vqa_accuracy"] <= 1.0 and "eval/sft_vqa_accuracy" in m
    model_dir = result["stages"][1]["outputs"]["model_dir"]
    config, processor = AutoConfig.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    assert (config.scale_factor, config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers) == \
        (4, 30, 12)
    assert processor.image_processor.size == {"longest_edge": 1024} and processor.image_seq_len == 64
    dpo = json.loads((workdir / "runs" / result["run_id"] / "dpo" / "stage.json").read_text())
    assert dpo["outputs"]["generation_shards"][0]["items"] == 1
    predictions = (workdir / "runs" / result["run_id"] / "eval" / "predictions_dpo_vqa.jsonl").read_text().splitlines()
    assert len(predictions) == 1
