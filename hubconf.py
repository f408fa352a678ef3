"""torch.hub entry points for densenet_zoo.

    model = torch.hub.load("<owner>/densenet_zoo", "densenet121", pretrained=True)
    model = torch.hub.load("/path/to/densenet_zoo", "densenet121", source="local", num_classes=10)
    torch.hub.list("<owner>/densenet_zoo")

Each entry takes the keyword arguments of the matching ``densenet_zoo`` builder
(``pretrained``, ``weights``, ``num_classes``, ``in_chans``, ``memory_efficient``, ``norm_layer``,
``features_only``...). ``optimize_for_inference`` is exposed too.
"""

dependencies = ["torch", "torchvision", "timm", "safetensors", "filelock", "tqdm", "PIL"]

from densenet_zoo import (  # noqa: E402,F401
    optimize_for_inference,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc_100,
    densenet_bc_190,
    densenet_bc_250,
)
