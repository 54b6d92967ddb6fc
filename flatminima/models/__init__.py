"""Model registry and architectures: small CPU models (MLP, 1-D CNN, small CNN) and the papers'
networks (CIFAR ResNet-18, VGG-16-BN, WRN-28-10, PyramidNet-164, ViT; ImageNet ResNet-50/101).

Example::

    from flatminima.models import create_model, list_models, count_parameters
    model = create_model("wrn28_10", num_classes=100, input_shape=(3, 32, 32))
    count_parameters(model)   # 36,536,884 (WRN-28-10, 100 classes)

Every model is a plain ``nn.Module`` without data-dependent Python control flow in ``forward``, so
``model.to(memory_format=torch.channels_last)`` and ``torch.compile(model)`` both work.
"""

from flatminima.models import pyramidnet, resnet, small, vgg, vit, wrn  # noqa: F401  (register)
from flatminima.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["create_model", "list_models", "count_parameters", "register_model"]
