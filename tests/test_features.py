"""Feature extractors: the preprocessing each states, on models built offline."""

import numpy as np
import open_clip
import pytest
import torch
import torchxrayvision as xrv

from evaluation.features import CLIPFeatures, InceptionFeatures, MissingWeightsError, XRVFeatures
from tests.helpers.evaluation import random_inception_weights, tiny_open_clip


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_inception_matches_torch_fidelity_with_the_same_weights(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = random_inception_weights(tmp_path / "inception.pth")
    ours = InceptionFeatures(str(path))
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).eval()
    x = images(2, 64)
    with torch.no_grad():
        expected = reference(x)[0].double()
    got = ours(x)
    assert got.dtype == torch.float64 and got.shape == (2, 2048)
    torch.testing.assert_close(got, expected)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="--inception-weights"):
        InceptionFeatures(str(tmp_path / "none.pth"))
    with pytest.raises(MissingWeightsError, match="densenet121"):
        XRVFeatures(weights_dir=str(tmp_path))


def test_xrv_features_use_torchxrayvision_normalisation():
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)
    ours = XRVFeatures(model=model)
    gray = images(2, 224)[:, :1].repeat(1, 3, 1, 1)  # a grayscale image stored as RGB
    reference_input = xrv.utils.normalize(gray[:, :1].numpy().astype(np.float32), 255)
    with torch.no_grad():
        expected = model.features2(torch.from_numpy(reference_input)).double()
    torch.testing.assert_close(ours(gray), expected, rtol=1e-5, atol=1e-5)
    assert ours(images(1, 300)).shape == (1, 1024)  # other sizes are centre-cropped and resized


def test_clip_features_are_normalised_embeddings(tmp_path):
    _, model = tiny_open_clip(tmp_path, "medsd-tiny-clip")
    ours = CLIPFeatures("medsd-tiny-clip", model=model)
    x = images(3, 32)
    feats = ours(x)
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image((x / 255 - mean) / std), dim=-1)
    torch.testing.assert_close(feats, expected.double(), rtol=1e-5, atol=1e-5)


def test_clip_without_weights_is_refused_rather_than_random():
    with pytest.raises(MissingWeightsError, match="--clip-weights"):
        CLIPFeatures("ViT-B-32")
