"""d2_smallbn: Cross-Iteration BN, Moving Average BN and Batch-Channel Norm + WS for detectron2.

``d2_smallbn.layers`` is pure PyTorch; the detectron2 integration lives in the other subpackages.
"""
__version__ = "0.1.0"
