"""Shared test set-up: the library modules live flat in training_code/, tests never touch the network; the
`slow` marker (`-m "not slow"` runs the fast tier) and the fixtures shared by several test files."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training_code"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds to minutes on CPU; deselect with -m 'not slow'")


@pytest.fixture(scope="module")
def one_thread():
    """Single-token forwards of a tiny model are dominated by thread start-up on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grid_setup():
    """A tiny grid-position model over the ARC format's characters, peaked, with eos about as likely as '\\n'."""
    import grid_positions as gp
    import model_tools as mt
    tok = mt.arc_tokenizer(chars=list("0123456789IO+/-=\n"))
    model = gp.create_grid_model(tok, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
                                 max_position_embeddings=512, seed=0).eval()
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        weight = model.lm_head.weight
        weight.mul_(20.0)
        weight[tok.eos_token_id] = 1.2 * weight[newline] + 0.2 * weight[tok.eos_token_id]
    return model, tok
