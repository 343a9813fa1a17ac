"""Models. Every model is a :class:`SplitModel`: ``features`` (x -> h) then ``classifier`` (h -> logits)."""

from fedlt.models import cnn, experts, resnet18_gn_experts, resnet_cifar, resnet_torchvision, shike  # noqa: F401
from fedlt.models.base import NormedLinear, SplitModel, build_model

__all__ = ["NormedLinear", "SplitModel", "build_model"]
