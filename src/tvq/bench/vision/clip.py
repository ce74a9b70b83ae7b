"""A Hugging Face CLIP vision tower as the suite's encoder, with zero-shot text heads: the paper's setting.

``--encoder /path/to/clip`` (a ``CLIPModel`` or ``CLIPVisionModel`` folder, e.g. one saved from
``openai/clip-vit-base-patch32``). The module fine-tuned and merged is
``CLIPVisionModelWithProjection`` for a ``CLIPModel`` folder (keys ``vision_model.*`` and
``visual_projection.weight``, exactly as in the CLIPModel checkpoint) or ``CLIPVisionModel``
(pooled output) for a vision-only folder. With ``head="text"`` each task's frozen head is the
normalised mean of the text embeddings of prompts such as "a photo of a {class}." (the paper's
zero-shot heads); the text tower is used once, at build time, and never fine-tuned.
Everything is read locally (``HF_HUB_OFFLINE``); a hub name works only where the user has it cached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tvq.bench import BenchError
from tvq.bench.model import _offline as hub_offline
from tvq.bench.vision.encoders import ImageEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")


def _offline() -> None:
    hub_offline()


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{folder}: not a Hugging Face model folder ({exc})") from None


def _normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The folder's ``preprocessor_config.json`` mean/std, else CLIP's."""
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        return tuple(pre["image_mean"]), tuple(pre["image_std"])
    except (OSError, ValueError, KeyError):
        return CLIP_MEAN, CLIP_STD


def _features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


def clip_encoder(spec: dict[str, Any], folder: Path | None = None) -> ImageEncoder:
    """The factory behind ``--encoder PATH`` / ``--encoder clip:PATH``; see the module docstring."""
    _offline()
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    source = Path(folder if folder is not None else spec.get("arg") or "")
    if not (source / "config.json").is_file():
        raise BenchError(f"--encoder clip:{source}: no config.json there (a CLIPModel or CLIPVisionModel folder is needed)")
    cfg = _config(source)
    kind = cfg.get("model_type")
    with_projection = kind == "clip" or "CLIPVisionModelWithProjection" in cfg.get("architectures", [])
    if kind not in ("clip", "clip_vision_model"):
        raise BenchError(f"{source}: model_type {kind!r} is not CLIP (expected 'clip' or 'clip_vision_model')")
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    if folder is None and kind == "clip":  # the vision half of a CLIPModel; its projection size is the model's
        from transformers import CLIPConfig

        full = CLIPConfig.from_pretrained(str(source))
        vision = full.vision_config
        assert isinstance(vision, CLIPVisionConfig)
        vision.projection_dim = int(full.projection_dim or vision.projection_dim)
        module = cls.from_pretrained(str(source), config=vision, torch_dtype=torch.float32)
    elif folder is None:
        module = cls.from_pretrained(str(source), torch_dtype=torch.float32)
    else:
        module = cls(CLIPVisionConfig.from_dict(cfg))
    module.eval()
    mean, std = _normalisation(source)
    size = int(spec.get("image_size") or module.config.image_size)  # type: ignore[arg-type]
    if size != module.config.image_size:
        native = module.config.image_size
        raise BenchError(f"{source}: the CLIP tower takes {native} px images, not {size} (pass --image-size {native})")
    module.config.architectures = [cls.__name__]
    extra = {"config.json": module.config.to_json_string()}
    pre_file = source / "preprocessor_config.json"
    if pre_file.is_file():
        extra["preprocessor_config.json"] = pre_file.read_text()
    text_head = (lambda classes: text_heads(source, classes)) if folder is None and kind == "clip" else None
    return ImageEncoder(
        kind="clip",
        spec={"arg": str(spec.get("arg") or source), "image_size": size},
        module=module,
        image_size=size,
        mean=tuple(mean),  # type: ignore[arg-type]
        std=tuple(std),  # type: ignore[arg-type]
        features=_features,
        text_head=text_head,
        extra_files=extra,
    )


@torch.no_grad()
def text_heads(folder: Path, classes: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """``[C, D]`` unit-norm zero-shot heads: per class, the mean of its normalised prompt embeddings."""
    _offline()
    from transformers import AutoTokenizer, CLIPModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise BenchError(f"{folder}: text heads need the CLIP tokenizer files there ({str(exc).splitlines()[0]})") from None
    model = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    rows = []
    for c in classes:
        batch = tokenizer([t.format(c) for t in templates], padding=True, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        rows.append(torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)
