"""Suite-wide test settings."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run torch on one thread: the tensors in tests are tiny, and two threads on a busy 2-core
    machine spend their time spin-waiting (100x slower per head forward, measured). One thread
    also keeps results bitwise comparable with the single-threaded subprocesses tests start."""
    import torch

    torch.set_num_threads(1)
    yield
