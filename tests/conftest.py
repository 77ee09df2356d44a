import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes of its own (commands, multi-process launches, "
                                       "studies) or trains for seconds: make test runs it, make test-fast "
                                       "(pytest -m 'not slow') leaves it out")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """d2_smallbn's cache (the record of decoded images) in a folder of this session, for every test
    and every process it starts."""
    os.environ["D2_SMALLBN_CACHE"] = str(tmp_path_factory.mktemp("d2_smallbn_cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning threads make
    them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
