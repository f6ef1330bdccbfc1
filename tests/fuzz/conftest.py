import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the fuzzed models are tiny, and on a busy 2-core machine (pytest -n 2)
    torch's thread pool costs milliseconds per op (measured: a 27-wide linear took 8 ms with two
    threads under load, 24 µs with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
