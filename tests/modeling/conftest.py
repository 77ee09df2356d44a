"""The tiny generated dataset of the integration tests, registered once per session."""
import pytest

from generated_images import make_images
from tiny_detector import register


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_images")
    records = make_images(str(folder))
    register("smallbn_tiny", records)
    return records
