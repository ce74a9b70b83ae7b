"""Image encoders the vision suite can fine-tune and merge: EfficientNet-Lite0 built in, any other pluggable.

An :class:`ImageEncoder` says how to build the module (whose ``state_dict`` keys are exactly the
checkpoint keys a task vector covers), how to turn uint8 images into its input, how to get
features from it (also through ``functional_call`` wrappers, for AdaMerging), and how to save and
reload it as a folder with ``model.safetensors``. A run folder records the encoder's ``kind`` and
``spec`` in ``tvq_encoder.json``, so evaluation rebuilds it without the original source.

Register your own with :func:`register_encoder` and select it with ``--encoder NAME[:ARG]``;
a Hugging Face CLIP folder is recognised by its ``config.json`` (see :mod:`.clip`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tvq.bench import BenchError
from tvq.bench.vision.efficientnet import MEAN, STD, EfficientNetLite0, load_efficientnet_lite0

ENCODER_FILE = "tvq_encoder.json"
WEIGHTS = "model.safetensors"
Features = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class ImageEncoder:
    """One image backbone: module, preprocessing, features, and (optionally) zero-shot text heads.

    ``features(model, pixels)`` gets the module or a ``functional_call`` wrapper and a float batch
    ``[B, 3, S, S]``; it returns unnormalised features ``[B, D]`` (the suite L2-normalises them).
    ``text_head(classes)`` returns ``[C, D]`` unit-norm class embeddings for zero-shot heads.
    ``extra_files`` are copied into every saved folder (configs a reader needs, e.g. HF's config.json).
    """

    kind: str
    spec: dict[str, Any]
    module: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    features: Features
    text_head: Callable[[Sequence[str]], torch.Tensor] | None = None
    extra_files: dict[str, str] = field(default_factory=dict)

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, H, W]`` or ``[B, H, W, 3]`` → normalised float ``[B, 3, S, S]`` (bilinear, antialiased)."""
        x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def save(self, model: nn.Module | Mapping[str, torch.Tensor], out_dir: Path) -> None:
        """``model.safetensors`` (every tensor of the state dict, buffers included) plus the spec."""
        out_dir.mkdir(parents=True, exist_ok=True)
        state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        (out_dir / ENCODER_FILE).write_text(json.dumps({"kind": self.kind, "spec": self.spec, "image_size": self.image_size}, indent=1) + "\n")
        for name, text in self.extra_files.items():
            (out_dir / name).write_text(text)


EncoderFactory = Callable[[dict[str, Any], Path | None], ImageEncoder]
_FACTORIES: dict[str, EncoderFactory] = {}


def register_encoder(kind: str, factory: EncoderFactory, *, replace: bool = False) -> None:
    """Make ``--encoder KIND[:ARG]`` build ``factory({"arg": ARG, "image_size": S}, None)``.

    With ``None`` the factory returns the *pretrained* encoder; with a folder (one it saved),
    it returns the same architecture to load that folder's weights into, without needing ARG's
    original source. ``arg`` and ``image_size`` may be missing from the spec.
    """
    if kind in _FACTORIES and not replace:
        raise BenchError(f"encoder '{kind}' is already registered (pass replace=True)")
    _FACTORIES[kind] = factory


def parse_encoder(name: str | None) -> tuple[str, dict[str, Any]]:
    """``None`` → EfficientNet-Lite0; an existing folder with a CLIP ``config.json`` → clip; else ``KIND[:ARG]``."""
    if name is None:
        return "efficientnet-lite0", {}
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return "clip", {"arg": str(Path(name).resolve())}
    kind, _, arg = name.partition(":")
    return kind, ({"arg": arg} if arg else {})


def make_encoder(name: str | None, image_size: int | None = None) -> ImageEncoder:
    """The pretrained encoder named on the command line (see :func:`parse_encoder`)."""
    kind, spec = parse_encoder(name)
    if image_size is not None:
        spec["image_size"] = image_size
    return encoder_from_spec(kind, spec)


def encoder_from_spec(kind: str, spec: dict[str, Any], folder: Path | None = None) -> ImageEncoder:
    _builtin()
    if kind not in _FACTORIES:
        raise BenchError(f"unknown image encoder '{kind}' (known: {', '.join(_FACTORIES)}; or an HF CLIP folder; register one with register_encoder)")
    return _FACTORIES[kind](dict(spec), folder)


def load_saved(folder: Path) -> tuple[ImageEncoder, nn.Module]:
    """The encoder recorded in ``folder`` and a module holding the folder's tensors (eval mode)."""
    try:
        info = json.loads((folder / ENCODER_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{folder}: not a saved image encoder ({exc})") from None
    enc = encoder_from_spec(info["kind"], info["spec"], folder)
    try:
        enc.module.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    except (OSError, RuntimeError) as exc:
        raise BenchError(f"{folder}: weights do not fit the '{info['kind']}' encoder ({str(exc).splitlines()[0]})") from None
    return enc, enc.module.eval()


def _efficientnet(spec: dict[str, Any], folder: Path | None) -> ImageEncoder:
    size = int(spec.get("image_size") or 64)
    spec = {"image_size": size}
    return ImageEncoder(
        kind="efficientnet-lite0",
        spec=spec,
        module=load_efficientnet_lite0() if folder is None else EfficientNetLite0().eval(),
        image_size=size,
        mean=MEAN,
        std=STD,
        features=lambda model, pixels: model(pixels),
    )


def _builtin() -> None:
    if "efficientnet-lite0" not in _FACTORIES:
        _FACTORIES["efficientnet-lite0"] = _efficientnet
        _FACTORIES["clip"] = import_module("tvq.bench.vision.clip").clip_encoder  # it builds on this module
