"""vlmlab's GradES freeze decisions checked against the official ``grades`` package (issue #27, part 2).

The official rule (``grades==1.0.6``, VLMGradEarlyStoppingCallback / GradEarlyStoppingCallback) runs unmodified,
but on a *shadow*: a private copy of the model whose tracked modules get the live weights copied in before every
check. The official callback freezes (``requires_grad=False``) and asks to stop only on the shadow and on a private
TrainerControl, so the live run is vlmlab's alone and the official rule sees exactly that run's weights, whatever
vlmlab froze. (Attached live, the official callback is no check: it leaves weights vlmlab froze out of its metric,
reads 0.0 and so copies vlmlab's decisions; its own freezing, bias included, would change vlmlab's run.)
``compare`` lines the two up per tracked matrix and says why they differ where they do.
See docs/grades_official.md for the rule-by-rule differences.

    .venv/bin/python benchmarks/grades_official.py                  # tiny run on the tiny Idefics3, table to stdout
    .venv/bin/python benchmarks/grades_official.py --steps 60 --json results/grades_official.json

In a benchmark: put ``OfficialShadow(...)`` next to vlmlab's ``GradESCallback`` (same tau/alpha/interval) in the
Trainer's callbacks, then ``compare(ours.history(), shadow.decisions())``; or replay saved weight snapshots with
``official_decisions(model, snapshots, max_steps, ...)``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REASONS = {
    "only_ours": "tracked by vlmlab only (the official name lists leave it out)",
    "only_official": "tracked by the official package only",
    "group": "the two assign it different groups, so different taus",
    "grace_rounding": "grace period: official allows step >= int(alpha*max_steps), vlmlab step >= alpha*max_steps",
    "first_check_zero": "official's first check only fills its weight cache and records change 0.0 (< tau)",
    "bias_in_metric": "official's L1 change covers every trainable parameter of the module (bias too), "
                      "vlmlab's only the weight matrix",
    "numeric": "same quantity, float rounding on either side of tau (torch.norm(p=1) vs abs().sum())",
    "metric_differs": "the two changes differ for another reason",
    "missing_check": "one side has no check at the step where the decisions part",
    "run_ended": "no common check where the decisions part (one side's check fell outside the other's run)",
}


def official_package():
    """The official ``grades`` package, never benchmarks/grades.py (which shadows it when a script in benchmarks/
    runs: Python puts the script's folder first on sys.path)."""
    import importlib

    here = Path(__file__).resolve().parent
    cached = sys.modules.get("grades")
    if cached is not None and Path(getattr(cached, "__file__", None) or "/").resolve().parent == here:
        del sys.modules["grades"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        return importlib.import_module("grades")
    finally:
        sys.path[:] = saved


def _unwrap(model):
    return getattr(model, "module", model)


def canonical(name: str) -> str:
    """Module path of a tracked matrix: vlmlab names full-tuning matrices by parameter (``...q_proj.weight``) and
    LoRA pairs by module; the official package by its own key, which ``OfficialShadow`` maps to the module path."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


class OfficialShadow(TrainerCallback):
    """Observe-only driver of the official GradES callback: it decides on a shadow copy of the model.

    kind: "vlm" (VLMGradEarlyStoppingCallback: vision_tau / language_tau), "text" (GradEarlyStoppingCallback, one
    tau = language_tau), or "auto" (vlm, falling back to text when the VLM callback finds nothing to track).
    shadow_device: where the copy lives ("cpu" keeps accelerator memory free; the weights are copied over anyway).
    unwrap_peft: hand the official callback the model inside a PEFT wrapper. grades 1.0.6 unwraps PeftModel to
    ``base_model.model`` (a *ForConditionalGeneration) and looks for the vision tower / language model right
    there, but transformers 5 keeps them one level deeper (``.model``), so on a LoRA VLM it tracks nothing (its
    own behaviour: ``kind`` then raises). True lets the comparison proceed on LoRA runs.
    """

    def __init__(self, vision_tau: float, language_tau: float, alpha: float, compute_interval: int,
                 max_frozen_ratio: float = 1.0, kind: str = "auto", shadow_device: str | None = "cpu",
                 unwrap_peft: bool = False):
        grades = official_package()
        if kind not in ("auto", "vlm", "text"):
            raise ValueError(f"kind must be auto, vlm or text, got {kind!r}")
        self.kind, self.shadow_device, self.unwrap_peft = kind, shadow_device, unwrap_peft
        self.settings = dict(vision_tau=vision_tau, language_tau=language_tau, alpha=alpha,
                             compute_interval=compute_interval, max_frozen_ratio=max_frozen_ratio)
        self._make = {
            "vlm": lambda: grades.VLMGradEarlyStoppingCallback(grades.VLMGradEarlyStoppingConfig(
                vision_tau=vision_tau, language_tau=language_tau, alpha=alpha, compute_interval=compute_interval,
                max_frozen_ratio=max_frozen_ratio, use_cuda_acceleration=False)),
            "text": lambda: grades.GradEarlyStoppingCallback(grades.GradEarlyStoppingConfig(
                tau=language_tau, alpha=alpha, compute_interval=compute_interval, max_frozen_ratio=max_frozen_ratio,
                use_cuda_acceleration=False)),
        }
        self.official = None
        self.shadow: torch.nn.Module | None = None
        self.target: torch.nn.Module | None = None  # what the official callback is handed: shadow, or inside PEFT
        self.modules: dict[str, str] = {}          # official key -> module path
        self.params: dict[str, list[str]] = {}     # official key -> parameter names its metric covers
        self.extra: dict[str, list[str]] = {}      # ... beyond the module's weight matrix (full mode: the bias)
        self._pairs: dict[str, list[tuple[torch.Tensor, str]]] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}  # official's own deque keeps only the last 100
        self.max_steps = 0
        self.would_stop_at: int | None = None
        self._control = TrainerControl()

    # -- Trainer hooks -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        live = _unwrap(model)
        shadow = copy.deepcopy(live)
        if self.shadow_device:
            shadow = shadow.to(self.shadow_device)
        self.shadow, self.max_steps = shadow, state.max_steps
        target = shadow
        if self.unwrap_peft and hasattr(shadow, "peft_config") and hasattr(shadow, "base_model"):
            target = shadow.base_model.model
        self.target = target
        for kind in (["vlm", "text"] if self.kind == "auto" else [self.kind]):
            self.official = self._make[kind]()
            self.official.on_train_begin(args, state, self._control, model=target)
            if self.official.initialized:
                self.kind = kind
                break
        if not self.official.initialized:
            raise ValueError("official grades: it tracks no attention/MLP projection of this model")
        path_of = {id(m): n for n, m in shadow.named_modules()}
        for key in self.official.component_stats:
            module = self.official._get_component_by_key(target, key)
            path = path_of[id(module)]
            self.modules[key] = path
            if self.official.mode == "lora":  # its metric: lora_A['default'] + lora_B['default']
                names = [f"{path}.lora_A.default.weight", f"{path}.lora_B.default.weight"]
                extra = []
            else:  # its metric: every parameter of the module that requires grad, concatenated
                names = [f"{path}.{n}" for n, p in module.named_parameters() if p.requires_grad]
                extra = [n for n in names if n != f"{path}.weight"]
            self.params[key], self.extra[key] = names, extra
            # what can change: the parameters trainable at the start (frozen base weights under LoRA never do)
            self._pairs[key] = [(p, f"{path}.{n}") for n, p in module.named_parameters() if p.requires_grad]
            self.history[key] = []
        self._live = dict(live.named_parameters(remove_duplicate=False))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.observe(args, state)

    # -- core: one official on_step_end on the shadow, after syncing the weights it will read ----------------
    def observe(self, args, state, source: dict[str, torch.Tensor] | None = None) -> None:
        """Run the official on_step_end for ``state.global_step``; ``source`` (parameter name -> tensor) replaces
        the live model's parameters (snapshot replay)."""
        step, interval = state.global_step, self.settings["compute_interval"]
        if step > 0 and step % interval == 0:
            src = source if source is not None else self._live
            with torch.no_grad():
                for key, pairs in self._pairs.items():
                    if not self.official.component_stats[key].frozen:
                        for p, name in pairs:
                            p.copy_(src[name].detach().to(p.device, p.dtype))
        self.official.on_step_end(args, state, self._control, model=self.target)
        for key, stats in self.official.component_stats.items():
            if stats.change_history and stats.change_history[-1][0] == step and (
                    not self.history[key] or self.history[key][-1][0] != step):
                self.history[key].append((step, float(stats.change_history[-1][1])))
        if self._control.should_training_stop and self.would_stop_at is None:
            self.would_stop_at = step

    # -- reporting -----------------------------------------------------------------------------------------
    def decisions(self) -> dict:
        """JSON-ready: per tracked module path, the official key, group, params its metric covers, (step, change)
        checks and frozen_at; plus the settings and the official grace step."""
        groups = {"vlm": lambda s: s.component_type, "text": lambda s: "language"}[self.kind]
        matrices = {}
        for key, stats in self.official.component_stats.items():
            matrices[self.modules[key]] = {
                "key": key, "group": groups(stats), "params": self.params[key], "extra_params": self.extra[key],
                "changes": [list(c) for c in self.history[key]], "frozen_at": stats.frozen_at_step}
        return {"kind": self.kind, "mode": self.official.mode, "settings": self.settings, "max_steps": self.max_steps,
                "min_steps_before_freeze": int(self.max_steps * self.settings["alpha"]),
                "would_stop_at": self.would_stop_at, "matrices": matrices}


def official_decisions(model: torch.nn.Module, snapshots: Iterable[tuple[int, dict[str, torch.Tensor]]],
                       max_steps: int, vision_tau: float, language_tau: float, alpha: float, compute_interval: int,
                       max_frozen_ratio: float = 1.0, kind: str = "auto", unwrap_peft: bool = False) -> dict:
    """The official rule applied to saved weights: ``model`` as it was at step 0 (trainable flags as in the run),
    ``snapshots`` (step, state dict) at every check step (step % compute_interval == 0), in order."""
    shadow = OfficialShadow(vision_tau, language_tau, alpha, compute_interval, max_frozen_ratio, kind,
                            unwrap_peft=unwrap_peft)
    state = TrainerState(max_steps=max_steps)
    args = argparse.Namespace(output_dir=tempfile.gettempdir())
    shadow.on_train_begin(args, state, TrainerControl(), model=model)
    for step, weights in snapshots:
        state.global_step = step
        shadow.observe(args, state, source=weights)
    return shadow.decisions()


# -- comparison --------------------------------------------------------------------------------------------
def _at(changes, step):
    return next((float(c) for s, c in changes if s == step), None)


def _decision(frozen_at, step) -> bool:
    return frozen_at is not None and frozen_at <= step


def compare(ours: dict, official: dict) -> list[dict]:
    """Per tracked matrix (module path): both frozen_at, agree (same decision at the same step) and, where they
    differ, a reason code (REASONS) found at the first check where the two decisions part.

    ours: ``GradESCallback.history()`` or a stage's grades_history.json; official: ``OfficialShadow.decisions()``.
    """
    settings = official["settings"]
    ours_grace = settings["alpha"] * official["max_steps"]
    off_grace = official["min_steps_before_freeze"]
    ours_by = {canonical(n): (n, v) for n, v in ours.items()}
    off_by = official["matrices"]
    rows = []
    for path in sorted(set(ours_by) | set(off_by)):
        o_name, o = ours_by.get(path, (None, None))
        f = off_by.get(path)
        row = {"matrix": path, "ours_name": o_name, "official_key": f and f["key"],
               "group": (o or f)["group"], "ours_frozen_at": o and o["frozen_at"],
               "official_frozen_at": f and f["frozen_at"], "agree": False, "reason": None,
               "step": None, "ours_change": None, "official_change": None}
        rows.append(row)
        if o is None or f is None:
            row["reason"] = "only_official" if o is None else "only_ours"
            continue
        if o["group"] != f["group"]:
            row["group"] = f"{o['group']}|{f['group']}"
        if o["frozen_at"] == f["frozen_at"]:
            row["agree"] = True
            continue
        if o["group"] != f["group"]:
            row["reason"] = "group"
            continue
        steps = sorted({s for s, _ in o["changes"]} | {s for s, _ in f["changes"]})
        part = next((s for s in steps if _decision(o["frozen_at"], s) != _decision(f["frozen_at"], s)), None)
        if part is None:
            row["reason"] = "run_ended"
            continue
        oc, fc = _at(o["changes"], part), _at(f["changes"], part)
        row.update(step=part, ours_change=oc, official_change=fc)
        if (part >= ours_grace) != (part >= off_grace):
            row["reason"] = "grace_rounding"
        elif oc is None or fc is None:
            row["reason"] = "missing_check"
        elif f["changes"] and f["changes"][0][0] == part and fc == 0.0:
            row["reason"] = "first_check_zero"
        elif abs(fc - oc) <= 1e-4 * max(abs(fc), abs(oc), 1e-12):
            row["reason"] = "numeric"
        elif f["extra_params"] and fc > oc:
            row["reason"] = "bias_in_metric"
        else:
            row["reason"] = "metric_differs"
    return rows


def summary(rows: list[dict]) -> dict:
    both = [r for r in rows if r["reason"] not in ("only_ours", "only_official")]
    reasons: dict[str, int] = {}
    for r in rows:
        if r["reason"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {"matrices": len(rows), "tracked_by_both": len(both), "agree": sum(r["agree"] for r in both),
            "reasons": reasons}


def table(rows: list[dict]) -> str:
    lines = ["| matrix | group | ours frozen_at | official frozen_at | agree | reason "
             "| where they part: step: ours / official change |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = "" if r["step"] is None else (f"{r['step']}: {_fmt(r['ours_change'])} / {_fmt(r['official_change'])}")
        lines.append(f"| {r['matrix']} | {r['group']} | {r['ours_frozen_at']} | {r['official_frozen_at']} | "
                     f"{'yes' if r['agree'] else 'no'} | {r['reason'] or ''} | {vals} |")
    return "\n".join(lines)


def _fmt(x):
    return "-" if x is None else f"{x:.4g}"


# -- a tiny real run: vlmlab's GradES freezing, the official rule watching ---------------------------------
TINY = dict(vocab_size=200, patch_size=8, scale_factor=2, vision_hidden=32, vision_layers=2, vision_heads=2,
            text_hidden=32, text_intermediate=64, text_layers=2, text_heads=2)


def tiny_model(out_dir: Path, rows: list[dict], image_size: int = 32, seed: int = 0):
    """The project's tiny Idefics3 (stages.support.tinyvlm), even smaller, and its processor."""
    from types import SimpleNamespace

    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from stages.support.tinyvlm import build

    texts = [r["question"] + " " + r["multiple_choice_answer"] for r in rows]
    build(texts, SimpleNamespace(**TINY), image_size, seed, out_dir)
    return Idefics3ForConditionalGeneration.from_pretrained(out_dir), AutoProcessor.from_pretrained(out_dir)


def encode(rows: list[dict], processor) -> list[dict]:
    """Prompt + answer examples, loss on the answer tokens only."""
    import io

    from PIL import Image

    out = []
    for r in rows:
        image = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            add_generation_prompt=True)
        full = prompt + " " + r["multiple_choice_answer"] + "<end_of_utterance>\n"
        enc = processor(text=full, images=[image], return_tensors="pt")
        n_prompt = len(processor(text=prompt, images=[image], return_tensors="pt")["input_ids"][0])
        labels = enc["input_ids"][0].clone()
        labels[:n_prompt] = -100
        out.append({"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0],
                    "pixel_values": enc["pixel_values"][0], "labels": labels})
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(b[key], (0, width - len(b[key])), value=value) for b in batch])

    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100), "pixel_values": torch.stack([b["pixel_values"] for b in batch])}


def tiny_run(steps: int = 40, compute_interval: int = 4, alpha: float = 0.25, vision_tau: float | None = None,
             language_tau: float | None = None, max_frozen_ratio: float = 1.0, seed: int = 0, rows: int = 16,
             learning_rate: float = 3e-3, lora: bool = False, out_dir: str | None = None) -> dict:
    """One tiny SFT run (Trainer, 1 CPU thread) with vlmlab's GradESCallback freezing and OfficialShadow
    watching, same settings (lora: LoRA r=4 on all linear layers; the official rule then needs unwrap_peft, see
    OfficialShadow). tau None: calibrated from a first observe-only pass as the median over the group's
    matrices of vlmlab's change at the check nearest 60 % of the run (so some freeze and some do not)."""
    from transformers import Trainer, TrainingArguments, set_seed

    from stages.support.grades import GradESCallback
    from stages.support.synthetic import generate

    torch.set_num_threads(1)
    work = Path(out_dir or tempfile.mkdtemp(prefix="grades_official_"))
    data_rows = generate("shapes-vqa", rows, seed, 32)
    model_dir = work / "model"
    model, processor = tiny_model(model_dir, data_rows, seed=seed)
    data = encode(data_rows, processor)
    pad_id = processor.tokenizer.pad_token_id

    def one(vt, lt, watch=True):
        from transformers import Idefics3ForConditionalGeneration

        set_seed(seed)
        m = Idefics3ForConditionalGeneration.from_pretrained(model_dir)
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        ours = GradESCallback(vt, lt, alpha, compute_interval, max_frozen_ratio)
        shadow = OfficialShadow(vt, lt, alpha, compute_interval, max_frozen_ratio, unwrap_peft=lora) if watch else None
        args = TrainingArguments(
            output_dir=str(work / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=learning_rate,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=10_000, save_strategy="no",
            report_to="none", use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=m, args=args, train_dataset=data, data_collator=lambda b: collate(b, pad_id),
                          callbacks=[ours, shadow] if watch else [ours])
        trainer.train()
        return ours, shadow, trainer.state.global_step

    calibrated = None
    if vision_tau is None or language_tau is None:
        observe, _, _ = one(0.0, 0.0, watch=False)  # tau 0: nothing freezes (the official rule needs tau > 0)
        calibrated = calibrate(observe.history(), 0.6 * steps)
        vision_tau = calibrated["vision"] if vision_tau is None else vision_tau
        language_tau = calibrated["language"] if language_tau is None else language_tau
    ours, shadow, ran = one(vision_tau, language_tau)
    official = shadow.decisions()
    rows_ = compare(ours.history(), official)
    return {"settings": {"steps": steps, "ran_steps": ran, "compute_interval": compute_interval, "alpha": alpha,
                         "vision_tau": vision_tau, "language_tau": language_tau,
                         "max_frozen_ratio": max_frozen_ratio, "calibrated": calibrated is not None},
            "ours_stopped_at": ours.stopped_at, "official_would_stop_at": shadow.would_stop_at,
            "ours": ours.history(), "official": official, "rows": rows_, "summary": summary(rows_)}


def calibrate(history: dict, at: float) -> dict[str, float]:
    import statistics

    taus = {}
    for group in ("vision", "language"):
        values = [min(e["changes"], key=lambda sc: abs(sc[0] - at))[1]
                  for e in history.values() if e["group"] == group and e["changes"]]
        taus[group] = float(f"{statistics.median(values):.4g}") if values else 0.0
    return taus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--vision-tau", type=float)
    p.add_argument("--language-tau", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="LoRA run (the official rule handed the model inside PEFT)")
    p.add_argument("--json", help="write the full result here")
    a = p.parse_args(argv)
    result = tiny_run(a.steps, a.interval, a.alpha, a.vision_tau, a.language_tau, seed=a.seed, lora=a.lora)
    print(json.dumps(result["settings"]))
    print(table(result["rows"]))
    print(json.dumps(result["summary"]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
