"""Any image model: a tiny random CLIP made here (never downloaded) plugged in with zero-shot text heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tvq.bench import BenchError  # noqa: E402
from tvq.bench.evaluate import open_run  # noqa: E402
from tvq.bench.vision.config import preset  # noqa: E402
from tvq.bench.vision.data import ImageData, ImageTaskSpec, register_image_task  # noqa: E402
from tvq.bench.vision.encoders import ImageEncoder, make_encoder, register_encoder  # noqa: E402
from tvq.bench.vision.train import build  # noqa: E402

torch.set_num_threads(2)


def _byte_vocab() -> dict[str, int]:
    """GPT-2/CLIP byte-level symbols, each alone and as a word end, plus the special tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    vocab = _byte_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 64, "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt")).save_pretrained(out)
    return out


def dots(_cache: Path) -> ImageData:
    """A bright square in the top-left (0) or bottom-right (1) corner of a 12x12 RGB image."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 30, (40, 12, 12, 3)).astype(np.uint8)
    y = np.arange(40) % 2
    for i in range(40):
        if y[i]:
            x[i, 7:11, 7:11] = 250
        else:
            x[i, 1:5, 1:5] = 250
    return ImageData("dots", x, y, ["top left", "bottom right"], "made up")


def test_clip_folder_is_recognised_with_its_own_preprocessing(clip_dir: Path) -> None:
    enc = make_encoder(str(clip_dir), None)
    assert enc.kind == "clip" and enc.image_size == 32 and enc.text_head is not None
    assert type(enc.module).__name__ == "CLIPVisionModelWithProjection"
    with torch.no_grad():
        assert enc.features(enc.module, enc.pixels(np.zeros((2, 12, 12, 3), np.uint8))).shape == (2, 16)
    heads = enc.text_head(["cat", "dog", "car"])
    assert heads.shape == (3, 16) and torch.allclose(heads.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(BenchError, match="takes 32 px"):
        make_encoder(f"clip:{clip_dir}", 64)


def test_clip_build_with_text_heads_and_evaluation(clip_dir: Path, tmp_path: Path) -> None:
    register_image_task(ImageTaskSpec("dots", dots, source="made up"), replace=True)
    config = preset("ci", tasks=["dots"], encoder=str(clip_dir), image_size=32, head="text", train_size=24, val_size=4,
                    test_size=8, epochs=1, batch_size=8, bn_images=8)  # fmt: skip
    m = build(config, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    assert m["encoder"]["kind"] == "clip" and m["task_info"]["dots"]["train"]["steps"] == 3
    # the saved tower has exactly the CLIPModel checkpoint's vision keys, and HF reads the folder as is
    full = load_file(str(clip_dir / "model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "dots" / "model.safetensors"))
    vision = {k for k in full if k.startswith("vision_model.") or k == "visual_projection.weight"}
    assert set(saved) == vision and all(saved[k].shape == full[k].shape for k in vision)
    from transformers import CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "run" / "dots"))
    assert load_file(str(tmp_path / "run" / "heads.safetensors"))["dots"].shape == (2, 16)
    run = open_run(tmp_path / "run")
    acc = run.evaluate_all(run.finetuned_path("dots"))
    assert acc["dots"] == pytest.approx(m["task_info"]["dots"]["finetuned"]["test"])  # no BatchNorm: the rule is a no-op


def test_a_registered_encoder_plugs_in(tmp_path: Path) -> None:
    """The documented Python API: any nn.Module with a features function."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def factory(spec: dict, folder: Path | None) -> ImageEncoder:
        torch.manual_seed(0)
        size = int(spec.get("image_size") or 16)
        return ImageEncoder("tiny", {"image_size": size}, Tiny().eval(), size, (0.5,) * 3, (0.5,) * 3, lambda m, x: m(x))

    register_encoder("tiny", factory, replace=True)
    register_image_task(ImageTaskSpec("dots", dots, source="made up"), replace=True)
    config = preset("ci", tasks=["dots"], encoder="tiny", image_size=16, train_size=24, val_size=4, test_size=8, epochs=1, batch_size=8, bn_images=8)
    build(config, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    run = open_run(tmp_path / "run")
    assert run.encoder.kind == "tiny" and set(run.evaluate_all(None)) == {"dots"}
    assert not torch.equal(load_file(str(tmp_path / "run" / "dots" / "model.safetensors"))["bn.running_mean"], torch.zeros(8))
