"""An opt-in fixture running a test module's torch code on one thread: tiny CPU models gain nothing from a second
thread, and on a loaded machine OpenMP's waiting for it makes them several times slower."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
