"""torchvision ResNet names -> detectron2's (``module.`` prefixes removed first):

    conv1.weight                     -> stem.conv1.weight
    bn1.*                            -> stem.conv1.norm.*
    layer{i}.{b}.conv{j}.weight      -> res{i+1}.{b}.conv{j}.weight     (bottleneck j=1..3, basic j=1..2)
    layer{i}.{b}.bn{j}.*             -> res{i+1}.{b}.conv{j}.norm.*
    layer{i}.{b}.downsample.0.weight -> res{i+1}.{b}.shortcut.weight
    layer{i}.{b}.downsample.1.*      -> res{i+1}.{b}.shortcut.norm.*
    fc.*                             -> dropped (or linear.* with keep_classifier)

and the depth a ResNet's blocks give."""
import re
from collections import Counter

NORM_KEY = re.compile(r"^(?P<mod>bn1|layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?:bn(?P<j>\d)|downsample\.1))"
                      r"\.(?P<rest>.+)$")
CONV_KEY = re.compile(r"^(?P<mod>conv1|layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?:conv(?P<j>\d)|downsample\.0))"
                      r"\.(?P<leaf>weight|bias)$")
CLASSIFIER_KEY = re.compile(r"^fc\.(?P<leaf>weight|bias)$")

_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101,
           (3, 8, 36, 3, True): 152}


def detectron2_module(match):
    """detectron2's module name for a ``CONV_KEY`` or ``NORM_KEY`` match of a conv or its norm."""
    if match.group("mod") in ("conv1", "bn1"):
        return "stem.conv1"
    base = f"res{int(match.group('stage')) + 1}.{match.group('block')}"
    return f"{base}.conv{match.group('j')}" if match.group("j") else f"{base}.shortcut"


def resnet_depth(blocks, bottleneck):
    """The ResNet depth of ``blocks`` per stage (res2-res5) of basic or bottleneck blocks, or None."""
    return _DEPTHS.get(tuple(blocks) + (bool(bottleneck),))


def torchvision_blocks(state):
    """([blocks of layer1..layer4], bottleneck or not) of a torchvision ResNet state dict."""
    blocks = Counter()
    for key in state:
        m = re.match(r"^layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)) + 1)
    bottleneck = any(re.match(r"^layer[1-4]\.\d+\.(conv3|bn3)\.", k) for k in state)
    return [blocks[i] for i in range(1, 5)], bottleneck
