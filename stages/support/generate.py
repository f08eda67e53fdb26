"""Batched greedy generation with a VLM checkpoint (on-policy DPO pairs), shardable over Ray workers."""
from __future__ import annotations

import io

from runtime import raytrain
from stages.support.training import user_turn


def pil(image):
    """An RGB PIL image from a canonical row's image (``{"bytes": ...}``) or a PIL image."""
    from PIL import Image

    if isinstance(image, dict):
        return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    return image.convert("RGB")


def generate_answers(model_dir: str, questions: list[str], images: list, batch_size: int = 64,
                     max_new_tokens: int = 8, device: str = "cpu", trust_remote_code: bool = False,
                     progress=None) -> list[str]:
    """Greedy short answers for (image, question) pairs, in order. In a Ray shard, loading is its start and
    ``generate`` its generation (runtime.cost.PHASES)."""
    with raytrain.phase("start"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                            use_safetensors=True).to(device).eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs = questions[start:start + batch_size]
        texts = [processor.apply_chat_template(user_turn(q), add_generation_prompt=True) for q in qs]
        batch = processor(text=texts, images=[[pil(im)] for im in images[start:start + batch_size]],
                          return_tensors="pt", padding=True).to(device)
        with torch.inference_mode(), raytrain.phase("generation"):
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        if progress is not None:
            progress(len(qs))
    return [a.strip() for a in answers]


def shard_batches(n_items: int, batch_size: int, n_shards: int) -> list[list[int]]:
    """Item indices per shard: shard k takes whole batches k, k+n, ... of the one-shard run, so every item is
    generated in the same batch (same padding) whatever the number of shards."""
    batches = [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]
    return [[i for batch in batches[k::n_shards] for i in batch] for k in range(n_shards)]
