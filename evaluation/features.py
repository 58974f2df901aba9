"""Image feature extractors for FID / KID, the copying test and prompt alignment.

Every extractor takes 8-bit RGB images as a uint8 tensor [B, 3, H, W] and returns float64
features [B, D], and carries a `label` saying what it is (network, weights, preprocessing), so
that every number computed from it can be reported with what it was computed on. FID values
from different extractors or preprocessing are not comparable.

Weights are never downloaded here: each extractor looks for its file where its library keeps it
(or at a path given), and raises `MissingWeightsError` saying where to put it, so an evaluation
can skip that metric and compute the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.safe_load import check_state_dict, load_pickled_module, module_classes

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
XRV_WEIGHTS = "densenet121-res224-all"


class MissingWeightsError(FileNotFoundError):
    """A feature extractor's weight file is not on disk; the message says where it belongs."""


class FeatureExtractor(nn.Module):
    label: dict

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 RGB images [B, 3, H, W], got {images.dtype} {list(images.shape)}"
            )
        return self.features(images).double()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class InceptionFeatures(FeatureExtractor):
    """The 2048-d pool features of the TensorFlow FID Inception, through torch-fidelity.

    Input as torch-fidelity takes it (uint8, resized inside the network to 299 px with its
    TensorFlow-compatible bilinear resize), so our FID equals torch-fidelity's on the same images.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = (
            Path(weights_path) if weights_path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        )
        if not path.is_file():
            raise MissingWeightsError(
                f"Inception weights not found at {path}: download {INCEPTION_FILE} from torch-fidelity's "
                f"releases into {path.parent}, or pass its path with --inception-weights"
            )
        # torch-fidelity unpickles the file fully: it is read safely and checked first.
        check_state_dict(path)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).eval()
        self.label = {
            "extractor": "inception-v3 (torch-fidelity, TF FID graph), 2048-d pool",
            "weights": str(path),
            "preprocessing": "uint8 RGB, torch-fidelity's TF-compatible bilinear resize to 299",
        }

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(_device_of(self.net)))[0]


def xrv_densenet(path: str | Path, release: str | None = XRV_WEIGHTS) -> nn.Module:
    """torchxrayvision's DenseNet-121 with the weights of the release file at `path`, set up as
    `xrv.models.DenseNet(weights=release)` sets it up (labels, thresholds, input resolution).

    The release files are whole pickled models, and torchxrayvision's own loader unpickles them
    without `weights_only`, which would run any code a crafted file holds: here the file is
    read allowing torch's and torchxrayvision's layer classes only (datamodules/safe_load.py)."""
    import torchxrayvision as xrv

    saved = load_pickled_module(path, module_classes("torch.nn", "torchxrayvision.models"))
    network = xrv.models.DenseNet(weights=None, num_classes=saved.classifier.out_features)
    network.load_state_dict(saved.state_dict())
    if release is not None:
        info = xrv.models.model_urls[release]
        network.weights = release
        network.targets = network.pathologies = info["labels"]
        if "op_threshs" in info:
            network.op_threshs = torch.tensor(info["op_threshs"])
        if "input_resolution" in info:
            network.input_resolution = info["input_resolution"]
    return network.eval()


class XRVFeatures(FeatureExtractor):
    """torchxrayvision DenseNet-121 (`densenet121-res224-all`) `features2`: 1024-d, RoentGen's
    domain FID. Grayscale scaled to [-1024, 1024], centre crop, 224 px, as torchxrayvision expects."""

    def __init__(self, weights_dir: str | None = None, model: nn.Module | None = None):
        super().__init__()
        import torchxrayvision as xrv

        if model is None:
            url = xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]
            folder = Path(os.path.expanduser(weights_dir or xrv.utils.get_cache_dir()))
            path = folder / os.path.basename(url)
            if not path.is_file():
                raise MissingWeightsError(
                    f"torchxrayvision weights not found at {path}: download {url} there, or pass the "
                    "folder holding it with --xrv-weights-dir"
                )
            model = xrv_densenet(path)
            source = str(path)
        else:
            source = "given model (tests)"
        self.net = model.eval()
        self.label = {
            "extractor": f"torchxrayvision DenseNet-121 {XRV_WEIGHTS} features2, 1024-d",
            "weights": source,
            "preprocessing": "mean of RGB, centre crop, bilinear resize to 224, scaled to [-1024, 1024]",
        }

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True)
        side = min(x.shape[-2:])
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[..., top : top + side, left : left + side]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (2 * x / 255 - 1) * 1024
        return self.net.features2(x.to(_device_of(self.net)))


class CLIPFeatures(FeatureExtractor):
    """An open_clip model (CLIP ViT-B/32, BiomedCLIP, ...): its normalised image embedding as
    features, and its text tower for prompt alignment (`text_features`).

    `model_name` is an open_clip model name or the path of a model config JSON (registered under
    its file stem, for local or custom architectures); `pretrained` is a weight file path or an
    open_clip tag already in the local cache; `model` may be given directly (tests build a small
    one from config).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model=None):
        super().__init__()
        import open_clip

        if model_name.endswith(".json"):
            if not Path(model_name).is_file():
                raise MissingWeightsError(f"open_clip model config {model_name} not found")
            open_clip.add_model_config(model_name)
            model_name = Path(model_name).stem
        self.model_name = model_name
        if model is None and pretrained is None:
            # open_clip would build the model with random weights: features that mean nothing.
            raise MissingWeightsError(
                f"no weights for open_clip {model_name}: pass --clip-weights (a weight file, or a tag "
                "already in open_clip's cache, e.g. 'openai')"
            )
        if model is None:
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception as error:  # open_clip raises RuntimeError, OSError, HF errors...
                raise MissingWeightsError(
                    f"open_clip {model_name} weights '{pretrained}' could not be loaded offline ({error}); "
                    "pass a local weight file"
                ) from error
        self.net = model.eval()
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        self.label = {
            "extractor": f"open_clip {model_name} image embedding (L2-normalised)",
            "weights": str(pretrained),
            "preprocessing": f"bicubic resize of the shorter side to {self.size}, centre crop, CLIP mean/std",
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.mean.device))
        return F.normalize(self.net.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> tuple[torch.Tensor, int]:
        """(Normalised text embeddings [B, D] float64, how many prompts filled the whole context).

        open_clip's tokenizers cut a prompt at the model's context length (77 tokens for CLIP); a
        prompt that fills it was most likely cut, and its score judges only its beginning.
        """
        import open_clip

        try:
            tokenizer = open_clip.get_tokenizer(self.model_name)
        except Exception as error:  # hub-hosted tokenizers (BiomedCLIP's) fail offline in several ways
            raise MissingWeightsError(
                f"the tokenizer of open_clip {self.model_name} could not be loaded offline ({error})"
            ) from error
        tokens = tokenizer(prompts)
        at_limit = int((tokens[:, -1] != 0).sum())
        embeddings = self.net.encode_text(tokens.to(self.mean.device)).float()
        return F.normalize(embeddings, dim=-1).double().cpu(), at_limit
