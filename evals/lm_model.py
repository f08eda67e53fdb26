"""lm-eval's `hf-multimodal` model, timed and shardable.

Timed: the seconds spent inside generation are the eval's busy time; when the first batch began generating marks
the end of lm-eval's start (tasks loaded, requests built). Shardable: as shard ``k`` of ``n`` it
generates only every n-th of lm-eval's own batches (from the k-th on) and answers "" for the rest, so every item's
prediction comes from exactly the batch, padding and thread count a one-shard run gives it. Cached: with an
``item_cache`` (evals/item_cache.py) a batch answered before is read back, and each batch it generates is written
there as soon as it finishes.
"""
from __future__ import annotations

import time

from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM
from lm_eval.models.utils import Collator

from evals.item_cache import ItemCache


@register_model("vlmlab-hf-multimodal")
class TimedHFMultimodalLM(HFMultimodalLM):
    """HFMultimodalLM that accumulates wall time spent in `generate` (``busy_seconds``; ``first_generation``: the
    perf_counter() its first batch began) and generates one shard's batches; ``owned`` holds the (task, doc_id) of the
    items it generated."""

    def __init__(self, *args, shard: int = 0, num_shards: int = 1, item_cache: ItemCache | None = None, **kwargs):
        # a decoder-only VLM: said outright, lm-eval would otherwise warn on every model that its type is "neither
        # CausalLM nor Seq2SeqLM" and then pick "causal" anyway
        kwargs.setdefault("backend", "causal")
        super().__init__(*args, **kwargs)
        self.busy_seconds = 0.0
        self.first_generation: float | None = None
        self.shard, self.num_shards = shard, num_shards
        self.owned: set[tuple[str, int]] = set()
        self.item_cache = item_cache
        self.generated = self.cached = 0  # items this shard generated / read from the item cache

    def _batches(self, requests) -> list[list[int]]:
        """Request indices per batch, exactly as HFMultimodalLM.generate_until batches them: grouped by generation
        settings, sorted by descending context length then context, cut into `batch_size` chunks."""
        def longest_first(x):
            return -len(self.tok_encode(x[0])), x[0]

        collator = Collator([(*r.args, i) for i, r in enumerate(requests)], longest_first, group_by="gen_kwargs",
                            group_fn=lambda x: x[1])
        return [[x[-1] for x in batch] for batch in collator.get_batched(n=self.batch_size, batch_fn=None)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # A subset made of whole batches, in the original order, is sorted and cut by the parent into those same
        # batches (a stable sort; only a group's last batch can be short, and it sorts last).
        mine = [batch for b, batch in enumerate(self._batches(requests)) if b % self.num_shards == self.shard]
        out = [""] * len(requests)
        if self.item_cache is None:
            indices = sorted(i for batch in mine for i in batch)
            answers = super().generate_until([requests[i] for i in indices], disable_tqdm) if indices else []
            self.generated += len(indices)
        else:  # batch by batch: each one on disk before the next begins
            indices, answers = [], []
            for batch in mine:
                batch_requests = [requests[i] for i in batch]
                found = self.item_cache.get(batch_requests)
                if found is None:
                    found = super().generate_until(batch_requests, True)
                    self.item_cache.put(batch_requests, found)
                    self.generated += len(batch)
                else:
                    self.cached += len(batch)
                indices += batch
                answers += found
        for i, answer in zip(indices, answers, strict=True):
            out[i] = answer
        self.owned |= {(requests[i].task_name, requests[i].doc_id) for i in indices}
        return out

    def _model_multimodal_generate(self, inputs, max_length, stop, **generation_kwargs):
        start = time.perf_counter()
        if self.first_generation is None:
            self.first_generation = start
        try:
            return super()._model_multimodal_generate(inputs, max_length, stop, **generation_kwargs)
        finally:
            self.busy_seconds += time.perf_counter() - start
