"""The one seeded fork of torch's random number generators, for code that draws from torch's global stream (weight
init, peft's adapter init, generate()'s sampling) but must neither depend on nor disturb the caller's stream.
Only torch is imported, so any module can use it.
"""
import contextlib

import torch


@contextlib.contextmanager
def seeded_torch(seed, device=None):
    """Run a block under torch.manual_seed(seed) inside a fork of the RNG state, restored on exit.

    device None forks the CPU and every CUDA device (weight init may draw on any); a torch.device forks the CPU
    and that device only (a CUDA device without index: the current one).
    """
    with torch.random.fork_rng(devices=_forked_cuda_devices(device)):
        torch.manual_seed(seed)
        yield


def _forked_cuda_devices(device):
    if device is None:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
