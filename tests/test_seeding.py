"""Tests for seeding.seeded_torch: reproducible draws inside, the caller's stream untouched outside."""
import torch

from seeding import seeded_torch


def test_seeded_torch_is_reproducible_and_leaves_the_global_stream_alone():
    for device in (None, torch.device("cpu")):
        torch.manual_seed(5)
        want_next = torch.rand(1)
        torch.manual_seed(5)
        with seeded_torch(3, device):
            a = torch.rand(4)
        with seeded_torch(3, device):
            b = torch.rand(4)
        with seeded_torch(4, device):
            c = torch.rand(4)
        assert torch.rand(1) == want_next
        assert torch.equal(a, b) and not torch.equal(a, c)
