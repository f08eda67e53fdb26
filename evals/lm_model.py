"""lm-eval's `hf-multimodal` model, timed: the seconds spent inside generation are the eval's busy time."""
from __future__ import annotations

import time

from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM


@register_model("vlmlab-hf-multimodal")
class TimedHFMultimodalLM(HFMultimodalLM):
    """HFMultimodalLM that accumulates wall time spent in `generate` (``busy_seconds``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy_seconds = 0.0

    def _model_multimodal_generate(self, inputs, max_length, stop, **generation_kwargs):
        start = time.perf_counter()
        try:
            return super()._model_multimodal_generate(inputs, max_length, stop, **generation_kwargs)
        finally:
            self.busy_seconds += time.perf_counter() - start
