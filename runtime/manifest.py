"""What ran: git sha, package versions, hardware, seeds, data fingerprints, config hash."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from runtime.secrets import redact_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vlmlab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "ray", "mlflow",
            "lm_eval", "tokenizers", "pydantic")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: list[Path]) -> str:
    """One hash over several files' names and contents (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        diff = git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        sha, diff = "", ""
    if not sha:  # no checkout (e.g. the container image): the sha it was built from, if given
        return {"sha": os.environ.get("VLMLAB_GIT_SHA") or None, "dirty": None}
    return {"sha": sha, "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def all_packages_hash() -> str:
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    return hashlib.sha256("\n".join(dists).encode()).hexdigest()


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch
        # the instruction set torch's own CPU kernels dispatch to (AVX2, AVX512...): two CPUs that print the same
        # model name can differ here, and so can a long training run's numbers
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpu_driver"] = _nvidia_driver()
    except ImportError:
        pass
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def container() -> dict | None:
    """Set when running in a container; the image digest comes from VLMLAB_IMAGE_DIGEST (the runtime knows it,
    the container does not)."""
    if not (Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()):
        return None
    return {"image": os.environ.get("VLMLAB_IMAGE"), "image_digest": os.environ.get("VLMLAB_IMAGE_DIGEST")}


def build_manifest(seed: int, config_hash: str) -> dict:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "packages_sha256": all_packages_hash(),
        "hardware": hardware(),
        "container": container(),
        "seed": seed,
        "config_sha256": config_hash,
        "command": redact_text(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
    }
