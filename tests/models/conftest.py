"""Model tests train tiny torch networks: one thread is fastest for them, and far faster on a busy 2-core box."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run each model test module with one torch thread, restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
