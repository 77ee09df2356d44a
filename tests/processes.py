"""Helpers for tests that start several processes (gloo on CPU)."""
import socket


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_url():
    """A ``tcp://`` URL for detectron2's ``launch`` (``dist_url``) on a free local port."""
    return f"tcp://127.0.0.1:{free_port()}"
