"""Reference training-time blocks, written as plain modules with no deploy code of their own.

reparam is what deploys them: `reparam.fuse(model)` turns each block into one conv.
"""

from .acnet import ACBlock
from .common import ConvBNFactory, conv_bn, plain_conv_bn, randomize_batchnorm
from .dbb import BNAndPad, DiverseBranchBlock, InceptionBlock
from .largekernel import DilatedReparamBlock, RepLKBlock
from .mobileone import MobileOne, MobileOneBlock, MobileOneS0
from .repvgg import RepVGG, RepVGGBlock
from .resnet import BasicBlock, ResNet18

__all__ = [
    "ACBlock",
    "BNAndPad",
    "BasicBlock",
    "ConvBNFactory",
    "DilatedReparamBlock",
    "DiverseBranchBlock",
    "InceptionBlock",
    "MobileOne",
    "MobileOneBlock",
    "MobileOneS0",
    "RepLKBlock",
    "RepVGG",
    "RepVGGBlock",
    "ResNet18",
    "conv_bn",
    "plain_conv_bn",
    "randomize_batchnorm",
]
