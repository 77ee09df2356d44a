import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """d2_smallbn's cache (the record of decoded images) in a folder of this session, for every test
    and every process it starts."""
    os.environ["D2_SMALLBN_CACHE"] = str(tmp_path_factory.mktemp("d2_smallbn_cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
