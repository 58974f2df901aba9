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


def tiny_open_clip(folder: Path, name: str, image_size: int = 32, patch_size: int = 16):
    """A one-layer open_clip model registered under `name` from a config JSON written to `folder`
    (the file a user passes as --clip-model), built from seed 0: (config path, model)."""
    import json

    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": patch_size,
        },  # fmt: skip
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return path, open_clip.create_model(name)
