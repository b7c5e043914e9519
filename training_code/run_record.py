"""Run records: what ran (command line, git commit, package versions), where (the device), when (the date), in one
format for every results file and run_config.json, and the atomic JSON writer they all go through.

torch is imported inside the device functions only, so the data scripts can write JSON without it.
"""
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

RUN_CONFIG = "run_config.json"
VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
    "unsloth", "unsloth_zoo", "bitsandbytes",
)


def write_json(path, data, **kw):
    """Write JSON via `<path>.tmp` + rename: a killed run never leaves a half-written file under the name."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, **kw)
    os.replace(tmp, path)


def process_age_s():
    """Seconds since this process started (Linux: its start in /proc, 10 ms ticks, on the boot-time clock, so the
    interpreter's start and every import count); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # from field 3 on: the command name may hold spaces
    except OSError:
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime


def peak_rss_gb():
    """The most resident memory this process has held so far, in GB (10^9 bytes); Linux reports it in KiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def command_line():
    """The command of this process as one string (what a reader pastes to run it again)."""
    return " ".join(sys.argv)


def device_name():
    """Where this process computes: '<n> x <GPU name>' for the visible GPUs, else 'CPU (<n> cores)'."""
    import torch

    n = torch.cuda.device_count()
    return f"{n} x {torch.cuda.get_device_name(0)}" if n else f"CPU ({os.cpu_count()} cores)"


def card_name(device):
    """The name of one torch.device's card, or 'cpu': the key in the benchmarks' file names (results/ keeps them)."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def utc_date():
    """Now, in UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def header():
    """The command / device / date record that opens every results file."""
    return {"command": command_line(), "device": device_name(), "date": utc_date()}


def package_versions():
    """Installed versions of the packages the results depend on (None where not installed)."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    """HEAD of the repository holding this file (or $GIT_COMMIT where the tree came without .git), or None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_run_config(path, settings=None):
    """Write run_config.json beside a saved model: settings, package versions, python, git commit, date, argv."""
    config = {
        "settings": settings or {},
        "versions": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": utc_date(),
        "argv": list(sys.argv),
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, RUN_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    return config


# ---- the benchmarks' measurements of a device ------------------------------------------------------

def measured_peak_flops(device):
    """bf16 (CUDA) or float32 (CPU) matmul FLOP/s measured on this device."""
    import torch
    n, dtype = (8192, torch.bfloat16) if device.type == 'cuda' else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.time(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.time() - start)


def results_path(kind, card):
    """results/benchmark_<kind>_<card>.json, spaces in the card name replaced by underscores."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, 'results', f"benchmark_{kind}_{card.replace(' ', '_')}.json")


def sync(device):
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == 'cuda':
        import torch
        torch.cuda.synchronize()


def measured_bandwidth(device):
    """Bytes/s of a large on-device copy (read + write), the card's practical memory bandwidth."""
    import torch
    n = 2 ** 28 if device.type == 'cuda' else 2 ** 24
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start, reps = time.time(), 10
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * 4 * n * reps / (time.time() - start)
