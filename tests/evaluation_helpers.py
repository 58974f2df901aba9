"""Offline stand-ins for evaluation weights that are normally downloaded."""

from pathlib import Path
from unittest import mock

import torch


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A randomly initialised FID Inception state dict saved where a real one would be given."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
    ):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path
