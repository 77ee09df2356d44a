"""The installed console scripts, as a user runs them (tests/ is on sys.path through pytest's rootdir
conftest; setup.py's entry points are installed next to the test interpreter by the checkout's venv)."""
import sys
from pathlib import Path


def installed(name):
    """The command line of console script ``name`` of the interpreter running the tests."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), (f"{name} is not installed next to {sys.executable}: reinstall the checkout "
                            "(make env, or pip install -e .) so that setup.py's console scripts exist")
    return [str(path)]
