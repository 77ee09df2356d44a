"""d2_smallbn: small-batch normalization (CBN, MABN, BCN+WS) for detectron2.

detectron2 is deliberately not a hard requirement, so that installing this package never
replaces a detectron2 built from source. ``pip install .[pinned]`` pulls the tested PyPI stack.
"""
from setuptools import find_packages, setup

setup(
    name="d2_smallbn",
    version="0.1.0",
    description="Cross-Iteration BN, Moving Average BN and Batch-Channel Norm + WS for detectron2",
    packages=find_packages(include=["d2_smallbn", "d2_smallbn.*"]),
    package_data={"d2_smallbn": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.8",
    # Every command has --help and is also `python -m d2_smallbn.<module>`.
    entry_points={"console_scripts": [
        "d2-smallbn-train = d2_smallbn.train_net:main",
        "d2-smallbn-eval = d2_smallbn.evaluation:main",
        "d2-smallbn-convert-weights = d2_smallbn.weights.cli:main",
        "d2-smallbn-convert = d2_smallbn.convert:main",  # the former name of d2-smallbn-convert-weights
        "d2-smallbn-dataset = d2_smallbn.data.cli:main",
        "d2-smallbn-quickstart = d2_smallbn.quickstart:main",
        "d2-smallbn-demo = d2_smallbn.demo:main",
        "d2-smallbn-benchmark = d2_smallbn.bench.model:main",
        "d2-smallbn-benchmark-layers = d2_smallbn.bench.layers:main",
    ]},
    install_requires=["torch>=1.13"],
    extras_require={
        # The pip-only route: detectron2 a59f0563 with a prebuilt _C for CPython 3.10 + torch 2.3.1.
        "pinned": [
            "torch==2.3.1", "torchvision==0.18.1", "sal-detectron2==0.7.2", "numpy<2",
            "fvcore>=0.1.5,<0.1.6", "iopath", "pycocotools", "opencv-python", "matplotlib",
        ],
        "test": ["pytest"],
    },
)
