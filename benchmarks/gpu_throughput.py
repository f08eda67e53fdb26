"""Training throughput and MFU of a SmolVLM-256M-sized VLM on one GPU (random weights, synthetic batches).

The model is SmolVLM-256M-Instruct's architecture built from config (Idefics3: a 12-layer SigLIP at 512 px,
patch 16, pixel-shuffle x4 -> 64 image tokens; a 30-layer SmolLM2-135M), so no hub download is needed. Each
step is what the sft stage does on a GPU: forward + backward + AdamW step, bf16 autocast over fp32 weights
(`precision: bf16`), or fp16 with a grad scaler (`precision: fp16`, the T4 setting).

    python benchmarks/gpu_throughput.py --batch-size 16 --steps 30 --out results/gpu_throughput.json

MFU counts 6 x params x tokens for the matrix products (vision params x 1,024 patches, text params x sequence
length, per sample) plus attention (12 x layers x seq^2 x width), against the card's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "T4": 65.0, "A10": 125.0}


def smolvlm_256m_config():
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=512, patch_size=16)
    text = LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2)
    return Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=4,
                          image_token_id=49190, tie_word_embeddings=True)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample besides the image's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA ops of 3 profiled steps")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_throughput.json"))
    args = parser.parse_args()
    from transformers import Idefics3ForConditionalGeneration

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = smolvlm_256m_config()
    model = Idefics3ForConditionalGeneration(config).to(device)
    model.config.use_cache = False
    params = {"vision": sum(p.numel() for p in model.model.vision_model.parameters()),
              "connector": sum(p.numel() for p in model.model.connector.parameters()),
              "text": sum(p.numel() for p in model.model.text_model.parameters())}
    image_tokens = (512 // 16) ** 2 // 16
    seq = image_tokens + args.text_tokens
    bsz = args.batch_size
    ids = torch.randint(100, 49000, (bsz, seq), device=device)
    ids[:, 1:1 + image_tokens] = config.image_token_id
    pixels = torch.randn(bsz, 1, 3, 512, 512, device=device)
    labels = ids.clone()
    labels[:, :1 + image_tokens] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")

    def step() -> float:
        with torch.autocast("cuda", dtype=dtype, enabled=args.precision != "fp32"):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    step_s = statistics.median(times)
    vision_layers, text_layers = 12, 30
    patches = (512 // 16) ** 2
    flops_per_sample = 6 * (params["vision"] * patches + (params["text"] + params["connector"]) * seq) \
        + 12 * (vision_layers * patches ** 2 * 768 + text_layers * seq ** 2 * 576)
    achieved = flops_per_sample * bsz / step_s / 1e12
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    result = {
        "benchmark": "gpu_train_throughput", "model": "SmolVLM-256M-sized Idefics3 (random weights)",
        "params": params, "params_total": sum(params.values()), "precision": args.precision,
        "batch_size": bsz, "sequence_length": seq, "image_tokens": image_tokens, "steps_timed": args.steps,
        "step_seconds_median": step_s, "step_seconds_min": min(times), "step_seconds_max": max(times),
        "samples_per_second": bsz / step_s, "tokens_per_second": bsz * seq / step_s,
        "model_tflops_per_second": achieved, "peak_bf16_tflops": peak,
        "mfu": achieved / peak if peak else None, "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": name,
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python benchmarks/gpu_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
