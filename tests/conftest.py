"""Suite-wide test settings and the fixtures several test modules share (helpers that are not
fixtures live in the helpers package)."""
import pytest

from helpers.processes import scheduling


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run torch on one thread: the tensors in tests are tiny, and two threads on a busy 2-core
    machine spend their time spin-waiting (100x slower per head forward, measured). One thread
    also keeps results bitwise comparable with the single-threaded subprocesses tests start."""
    import torch

    torch.set_num_threads(1)
    yield


SCHEDULING = scheduling()


@pytest.fixture(autouse=True)
def scheduling_unchanged():
    """A library that changes the test process's scheduling (SVT-AV1's encoder made it real-time)
    changes it for every command later tests start: fail the test that did it, by name."""
    yield
    assert scheduling() == SCHEDULING, "this test changed the test process's scheduling " \
        f"from {SCHEDULING} to {scheduling()}; every later child would inherit it"


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
    """4 training and 2 validation videos in a store, and their annotations."""
    from helpers.training import synthetic_videos, write_annotations, write_store

    root = tmp_path_factory.mktemp("synthetic")
    videos = {**synthetic_videos(4, "training"), **synthetic_videos(2, "validation", first=4)}
    return write_store(root / "store.zarr", videos), write_annotations(root / "gt.json", videos)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """The tiny extraction backbone as a ``--backbone`` file."""
    from helpers.extraction import write_backbone_file

    return write_backbone_file(tmp_path_factory.mktemp("backbone"))
