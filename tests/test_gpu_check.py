"""scripts/gpu-check: the GPU machine's wheel set and call plan, checked here without wheels, GPU or network."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"
LOCK = json.loads((ROOT / "scripts" / "gpu-wheels.json").read_text())


def dry_run(stage_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--stage-root", str(stage_root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_without_wheels_prints_the_plan_and_names_every_missing_wheel(tmp_path):
    done = dry_run(tmp_path)  # an empty stage root: nothing fetched
    out = done.stdout
    assert done.returncode == 3, out + done.stderr  # 3: not staged yet (1 would be a wrong wheel set)
    assert "PROBLEMS" not in out
    missing = out.split("MISSING", 1)[1]
    assert "run scripts/gpu-check --fetch-wheels" in missing
    assert all(w["file"] in missing for w in LOCK["wheels"])
    # one device call per transfer folder, back to back; the last installs its folder and runs the check
    n = len(LOCK["parts"])
    assert n >= 2  # Ray's wheel alone is 76 MiB (45 pruned): never one call
    for k in range(1, n):
        assert f'run(carry=[".whl-{k}"], timeout_s=180, command="PYTHONUNBUFFERED=1 python3 scripts/gpu-check ' \
               f'--device-install .whl-{k}")' in out
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # then one call per part, in priority order: the dpo pair (one node, then the cluster layout), the real shape
    for k, part in ((n, "dpo"), (n + 1, "real-shape")):
        call = next(line for line in out.splitlines() if line.strip().startswith(f"{k}. run("))
        assert f'carry=[".whl-{n}"], timeout_s=600' in call
        assert f"VLMLAB_GIT_SHA={sha}" in call and f'--device .whl-{n} --parts {part} --out \\"$OUT\\"' in call
        assert len(json.loads(call.split("command=", 1)[1][:-1])) <= 2000  # the device tool's limit
    assert "parts: dpo (needs >= 240 s); real-shape (needs >= 150 s)" in out
    assert out.count("fits (planned)") == n and "TOO LARGE" not in out


def test_dry_run_flags_a_wheel_that_differs_from_its_folder_list(tmp_path):
    folder = tmp_path / ".whl-1"
    folder.mkdir()
    wheel = LOCK["wheels"][0]
    (folder / wheel["file"]).write_bytes(b"not the wheel")
    (folder / "stray-1.0-cp311-cp311-win_amd64.whl").write_bytes(b"")
    (folder / "PART.json").write_text(json.dumps({"part": 1, "of": 1, "device_checks": {}, "wheels": [
        {"file": wheel["file"], "name": wheel["name"], "size": wheel["size"], "sha256": wheel["sha256"]}]}))
    done = dry_run(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    problems = done.stdout.split("PROBLEMS:", 1)[1]
    assert f".whl-1/{wheel['file']}: differs from PART.json" in problems
    assert ".whl-1/stray-1.0-cp311-cp311-win_amd64.whl: not installable" in problems


def test_the_wheel_set_carries_the_pins_and_not_what_the_device_has():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    wheels = {w["name"]: w for w in LOCK["wheels"]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("[")[0].split("==") for d in (p.replace("[default,train,tune]", "") for p in pyproject)
                if "==" in d)
    for name in ("ray", "mlflow", "trl", "datasets", "lm-eval", "transformers", "peft"):
        assert wheels[name]["version"] == pins[name], name
    assert "accelerate" not in wheels  # the device's 1.15.0 is the pin
    assert "torch" not in wheels and "numpy" not in wheels  # the device's CUDA torch is the point
    assert wheels["ray"]["extras"] == ["default", "train", "tune"]
    assert wheels["ray"]["prune"] == ["ray/jars/ray_dist.jar"] and wheels["ray"]["staged_size"] < 60 * 2**20
    assert all(w["file"].endswith(".whl") for w in LOCK["wheels"])
    planned = [f for part in LOCK["parts"] for f in part]
    assert sorted(planned) == sorted(w["file"] for w in LOCK["wheels"])  # each wheel in exactly one transfer


def load_script():
    """scripts/gpu-check as a module (its main() runs only as a script)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_pruning_drops_the_member_and_its_record_line(tmp_path):
    src, dest = tmp_path / "demo-1.0-py3-none-any.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("demo/__init__.py", "x = 1\n")
        z.writestr("demo/big.jar", b"\0" * 1000)
        z.writestr("demo-1.0.dist-info/RECORD", "demo/__init__.py,sha256=a,6\ndemo/big.jar,sha256=b,1000\n")
    load_script().pruned_copy(src, dest, ["demo/big.jar"])
    with zipfile.ZipFile(dest) as z:
        assert z.namelist() == ["demo/__init__.py", "demo-1.0.dist-info/RECORD"]
        assert z.read("demo-1.0.dist-info/RECORD") == b"demo/__init__.py,sha256=a,6\n"
        assert z.read("demo/__init__.py") == b"x = 1\n"


def test_compatible_wheel_tags():
    compatible = load_script().compatible
    assert compatible("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
    assert compatible("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl")
    assert compatible("trl-1.16.0-py3-none-any.whl")
    assert not compatible("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl")
    assert not compatible("numpy-2.5.2-cp312-cp312-manylinux_2_40_x86_64.whl")  # newer glibc than the device's
    assert not compatible("numpy-2.5.2-cp312-cp312-manylinux_2_28_aarch64.whl")


def test_runs_agree_within_half_a_point_on_eval_metrics_only():
    compare = load_script().compare
    first = {"eval/vqa_accuracy": 0.600, "eval/chartqa_relaxed_accuracy": 0.40, "eval/seconds": 3.0,
             "sft/train_loss": 0.5, "eval/mean_accuracy": 0.5}
    second = {"eval/vqa_accuracy": 0.605, "eval/chartqa_relaxed_accuracy": 0.3949, "eval/seconds": 9.0,
              "sft/train_loss": 0.9}
    rows = {r["metric"]: r["ok"] for r in compare(first, second, 0.005)}
    assert rows == {"eval/vqa_accuracy": True, "eval/chartqa_relaxed_accuracy": False, "eval/mean_accuracy": False}


def test_peak_memory_per_stage_from_samples_and_stage_rules():
    script = load_script()
    sampler = script.MemorySampler(Path("/dev/null"))
    sampler.samples = [(1.0, 500, 0), (2.0, 900, 50), (3.0, 700, 100), (4.0, float("nan"), 0), (5.0, 2000, 90)]
    assert sampler.window(1.5, 3.5) == {"peak_memory_mib": 900, "mean_util_pct": 75.0, "samples": 2}
    assert sampler.window(3.5, 4.5) is None  # only a failed read
    assert script.RULE.match("──────── stage sft ────────").group(1) == "sft"
    assert script.RULE.match("stage sft done in 3.1s") is None


def test_real_shape_record_predicts_at_the_batch_the_run_used():
    """The device's comparison: the plan made here at the batch resources.fit chose there, against the measured
    torch.cuda.max_memory_allocated, the step time and MFU from the counted FLOPs."""
    gib = 2 ** 30
    estimated = {"plans": {"sft": {"fixed": 2 * gib, "per_sample": 1 * gib, "gradients": 0.5 * gib, "update": 1 * gib,
                                   "flops_per_sample": 6e12}},
                 "constants": {"step_floor_s": 0.029, "step_floor_per_tensor_s": 0.00013, "mfu": 0.34},
                 "model": {"param_tensors": 471}, "peaks": {"H100": {"tflops": 756.0}, "H200": {"tflops": 989.4}}}
    result = {"config": {"sft": {"batch_size": 4, "gradient_accumulation_steps": 2}},
              "metrics": {"sft/steps": 30, "sft/step_seconds": 30 * 0.5, "sft/max_memory_allocated_gib": 6.25},
              "fit": {"stages": {"sft": {"batch_size": 4}}}}
    record = load_script().real_shape_record(estimated, result, {"gpus": [{"name": "NVIDIA H200"}]})
    assert record["card"] == "H200" and record["predicted_peak_gib"] == pytest.approx(2 + 4 + 0.5)
    assert record["memory_error"] == pytest.approx(6.5 / 6.25 - 1)
    floor = 0.029 + 0.00013 * 471
    assert record["predicted_step_s"] == pytest.approx(2 * floor + 48e12 / (989.4e12 * 0.34))
    assert record["mfu"] == pytest.approx(48e12 / 0.5 / 989.4e12) and record["fit"] == {"batch_size": 4}
