"""FID protocols: each gives its library's own FID with the same network, and they differ from each other.

The networks are random (no weights can be downloaded here) but the same on both sides of each
comparison, so an equality shows that the pipeline (file reading, resize, network input) is the
library's, whatever the weights.
"""

import copy
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation.features import MissingWeightsError
from evaluation.fid_protocols import (
    CLEANFID_INCEPTION_FILE,
    PROTOCOLS,
    fid_protocol,
    roentgen_selection,
)
from evaluation.statistics import FeatureStatistics, frechet_distance
from evaluation.suite import load_uint8
from tests.helpers.evaluation import random_inception_weights, tiny_open_clip

pytestmark = [
    pytest.mark.slow,
    # TorchScript (the format of clean-fid's Inception) is deprecated in recent torch, still supported.
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    # clean-fid's own Fréchet distance passes an argument SciPy deprecates.
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
]

# (width, height): square, non-square, and larger than 299 so that clean-fid's resize shrinks them.
SIZES = [(64, 64), (96, 56), (330, 300), (310, 420), (120, 90)]


def write_images(folder: Path, n: int, seed: int, brightness: float = 0.0, sizes=SIZES) -> list[Path]:
    """n PNGs of stripes and noise, of several sizes; `brightness` shifts one set from another."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        stripes = np.sin(2 * np.pi * (rng.uniform(1, 6) * x + rng.uniform(0, 3) * y) + rng.uniform(0, 6))
        image = 120 + brightness + 90 * stripes[..., None] * rng.uniform(0.2, 1, 3)
        image = image + rng.normal(0, 15, (height, width, 3))
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def fid_of(first: np.ndarray, second: np.ndarray) -> float:
    a, b = FeatureStatistics().update(first), FeatureStatistics().update(second)
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


class TinyNet(nn.Module):
    """A random stand-in for clean-fid's network: float images [B, 3, H, W] in [0, 255] -> [B, 12]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.Conv2d(8, 12, 5, stride=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x / 128 - 1)).mean(dim=(2, 3))


class TinyUint8Net(nn.Module):
    """A random custom `feature=` module for torchmetrics: uint8 images -> [B, 6], in its own dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.to(self.conv.weight.dtype) / 255)).mean(dim=(2, 3))


def test_clean_fid_protocol_equals_clean_fid_compute_fid(tmp_path):
    from cleanfid import fid

    real = write_images(tmp_path / "real", 40, seed=0)
    fake = write_images(tmp_path / "fake", 40, seed=1, brightness=60)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyNet()), tmp_path / "net.pt")

    # A custom extractor makes compute_fid use it as is: no Inception and no statistics downloaded.
    expected = fid.compute_fid(
        str(tmp_path / "real"),
        str(tmp_path / "fake"),
        mode="clean",
        custom_feat_extractor=torch.jit.load(tmp_path / "net.pt"),
        num_workers=0,
        batch_size=16,
        device=torch.device("cpu"),
        verbose=False,
    )
    protocol = fid_protocol("clean-fid", model=torch.jit.load(tmp_path / "net.pt"), batch_size=16)
    ours = fid_of(protocol.features(real), protocol.features(fake))
    assert protocol.features(real).dtype == np.float64
    # Asked: 1e-3. They agree to about 1e-7, while another resize (torch's antialiased bilinear to
    # 299) moves this FID by about 5e-3, so the check is tighter.
    assert ours == pytest.approx(expected, rel=1e-5)
    assert ours > 0.01  # the two sets differ: the check is not between two zeros


def test_torchmetrics_protocol_equals_torchmetrics_fid(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    sizes = [(48, 40), (40, 56), (64, 64)]
    real = write_images(tmp_path / "real", 24, seed=2, sizes=sizes)
    fake = write_images(tmp_path / "fake", 24, seed=3, brightness=-30, sizes=sizes)
    torch.manual_seed(0)
    network = TinyUint8Net()

    metric = FrechetInceptionDistance(feature=copy.deepcopy(network), normalize=False)
    metric.set_dtype(torch.float64)
    metric.update(load_uint8(real, 32), real=True)
    metric.update(load_uint8(fake, 32), real=False)
    expected = float(metric.compute())

    protocol = fid_protocol("torchmetrics", model=network, size=32, batch_size=10)
    ours = fid_of(protocol.features(real), protocol.features(fake))
    assert ours == pytest.approx(expected, rel=1e-5)  # asked: 1e-3; float32 vs float64 network: ~1e-7
    assert ours > 1e-3


INCEPTION_LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1"]
INCEPTION_LAYERS += ["Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b"]
INCEPTION_LAYERS += ["Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]


class CleanFIDInceptionFile(nn.Module):
    """torch-fidelity's Inception in the form of clean-fid's TorchScript file: `layers` maps the
    normalised 299 x 299 input to the 2048-d pool, the resize and normalisation stay outside."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*[getattr(inception, name) for name in INCEPTION_LAYERS])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_the_three_protocols_differ_on_the_same_network(tmp_path):
    """One random Inception through the three pipelines: the features differ, by the resize alone."""
    paths = write_images(tmp_path / "images", 2, seed=4, sizes=[(400, 330)])  # non-square, above 299
    weights = random_inception_weights(tmp_path / "inception.pth")
    protocols = {"torch-fidelity": fid_protocol("torch-fidelity", weights=weights)}
    network = protocols["torch-fidelity"].extractor.net
    torch.jit.save(torch.jit.script(CleanFIDInceptionFile(network)), tmp_path / CLEANFID_INCEPTION_FILE)
    protocols["clean-fid"] = fid_protocol("clean-fid", weights=tmp_path / CLEANFID_INCEPTION_FILE)
    protocols["torchmetrics"] = fid_protocol("torchmetrics", weights=weights)

    features = {name: protocol.features(paths) for name, protocol in protocols.items()}
    assert {f.shape for f in features.values()} == {(2, 2048)}
    for first, second in [("torch-fidelity", "clean-fid"), ("torch-fidelity", "torchmetrics")]:
        assert relative_difference(features[first], features[second]) > 1e-3, (first, second)
    assert relative_difference(features["clean-fid"], features["torchmetrics"]) > 1e-3
    for name, protocol in protocols.items():
        assert protocol.label["protocol"] == name and set(protocol.label) >= {"extractor", "weights"}
    assert "aspect not kept" in protocols["clean-fid"].label["preprocessing"]
    assert "antialias=True" in protocols["torchmetrics"].label["preprocessing"]
    assert set(protocols) == set(PROTOCOLS)

    # Without antialiasing torchmetrics' extractor is torch-fidelity's again: the resize made the difference.
    plain = fid_protocol("torchmetrics", weights=weights, antialias=False).features(paths)
    np.testing.assert_allclose(plain, features["torch-fidelity"], rtol=1e-5, atol=1e-6 * np.abs(plain).max())


def test_missing_weights_name_the_file(tmp_path):
    path = tmp_path / CLEANFID_INCEPTION_FILE
    with pytest.raises(MissingWeightsError, match=str(path)):
        fid_protocol("clean-fid", weights=path)
    with pytest.raises(MissingWeightsError, match="inception"):
        fid_protocol("torchmetrics", weights=tmp_path / "none.pth")


def test_unknown_choices_and_sizes_are_refused():
    with pytest.raises(ValueError, match="clean-fid"):
        fid_protocol("pytorch-fid")
    with pytest.raises(ValueError, match="inception"):
        fid_protocol("torchmetrics", "clip")
    with pytest.raises(ValueError, match="size"):
        fid_protocol("clean-fid", model=TinyNet(), size=256)


class RecordingXRV(nn.Module):
    """Stands in for the DenseNet: keeps what `features2` is given."""

    def features2(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.mean(dim=(2, 3))


def test_xrv_protocol_is_roentgens_transform_after_the_299_resize(tmp_path):
    import torchxrayvision as xrv

    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "flat.png"
    Image.new("RGB", (350, 300), (200, 100, 50)).save(path)  # one colour: any resize keeps it
    recorder = RecordingXRV()
    protocol = fid_protocol("clean-fid", "xrv", model=recorder)
    protocol.features([path])
    gray = 0.2989 * 200 + 0.587 * 100 + 0.114 * 50
    assert recorder.seen.shape == (1, 1, 224, 224)
    expected = torch.full_like(recorder.seen, 2048 * gray / 255 - 1024)
    torch.testing.assert_close(recorder.seen, expected, atol=0.05, rtol=0)

    torch.manual_seed(0)
    features = fid_protocol("clean-fid", "xrv", model=xrv.models.DenseNet(weights=None)).features([path])
    assert features.shape == (1, 1024) and features.dtype == np.float64
    steps = protocol.label["preprocessing"]
    assert "299x299" in steps and "rgb_to_grayscale" in steps and "2048 x / 255 - 1024" in steps


def test_clip_protocol_is_clean_fids_unnormalised_embedding(tmp_path):
    from torchvision import transforms

    _, model = tiny_open_clip(tmp_path, "medsd-fid-clip", image_size=224, patch_size=32)
    paths = write_images(tmp_path / "images", 2, seed=5, sizes=[(330, 300), (120, 90)])
    features = fid_protocol("clean-fid", "clip", model=model).features(paths)

    # clean-fid's CLIP input: the shorter side to 224, centre crop, no 299 resize at all.
    bicubic = transforms.InterpolationMode.BICUBIC
    crop = transforms.Compose([transforms.Resize(224, bicubic), transforms.CenterCrop(224)])
    pixels = torch.stack([torch.from_numpy(np.array(crop(Image.open(p).convert("RGB")))) for p in paths])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.encode_image((pixels.permute(0, 3, 1, 2) / 255 - mean) / std).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1)  # not L2-normalised


def test_roentgen_selection_keeps_the_first_image_of_each_prompt():
    paths = [f"{prompt}_{k}.png" for prompt in range(4) for k in range(3)]
    prompt_index = [prompt for prompt in range(4) for _ in range(3)]
    assert roentgen_selection(paths, prompt_index) == ["0_0.png", "1_0.png", "2_0.png", "3_0.png"]
    assert roentgen_selection(paths, prompt_index, limit=2) == ["0_0.png", "1_0.png"]
    assert roentgen_selection(paths, limit=5) == paths[:5]  # the real side: the first 5 listed
    drawn = roentgen_selection(paths, limit=5, seed=0)
    assert len(set(drawn)) == 5 and drawn == sorted(drawn, key=paths.index)  # a subset, in order
    assert drawn == roentgen_selection(paths, limit=5, seed=0) != roentgen_selection(paths, limit=5, seed=1)
