"""Fixed networks for LeaSE: the audience ResNets and the evaluation network of a genotype."""

from .eval_net import NetworkCIFAR, NetworkImageNet, build_eval_net, count_parameters
from .resnet import build_audience, resnet18, resnet50

__all__ = [
    "NetworkCIFAR",
    "NetworkImageNet",
    "build_eval_net",
    "count_parameters",
    "build_audience",
    "resnet18",
    "resnet50",
]
