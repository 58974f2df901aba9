"""The FID protocols of the papers medsd is compared with, as feature pipelines.

An FID is only comparable with another computed the same way: how the files are read, how they
are resized to the network's input (kernel, antialiasing, aspect ratio), which network and how its
output is taken all move the number, often by more than the differences between models. A protocol
here is exactly that part: image files -> features [N, D] float64, with a `label` that says what was
done. The Fréchet distance, KID and their intervals are then computed by medsd on those features,
so every protocol gets the same statistics and only the pipeline differs.

- "torch-fidelity": medsd's own pipeline, `InceptionFeatures` (torch-fidelity's Inception with its
  TensorFlow-compatible resize) on the images as `load_uint8` reads them.
- "clean-fid": RoentGen's (Chambon et al.), through the clean-fid library itself: clean-fid reads
  the files and resizes them (mode "clean": PIL bicubic straight to 299 x 299, so non-square
  images are squashed) and its `get_files_features` runs the network, as RoentGen's
  `eval/calculate_fid.py` does (github.com/StanfordMIMI/RoentGen, commit 05585a7). Three networks,
  as in that script: clean-fid's TorchScript Inception, CLIP ViT-B/32 (unnormalised embeddings,
  with clean-fid's CLIP resize instead of the 299 one) and torchxrayvision's DenseNet `features2`.
- "torchmetrics": Prompt to Polyp's, through torchmetrics' `FrechetInceptionDistance`: its own
  feature extractor, fed uint8 images. Since torchmetrics 1.8 that extractor resizes with an
  antialiased bilinear filter by default, so it no longer equals torch-fidelity.

Weights are never downloaded: each network is read from where its library keeps it or from a path
given, and a missing file raises `MissingWeightsError` saying where to put it. clean-fid is used
with `num_workers=0` (no worker processes) and with the networks built here, so it never reaches
the network either.

`roentgen_selection` picks the images RoentGen's script compares: the first image of each prompt,
at most 5,000 per side.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datamodules.safe_load import check_state_dict

from .features import (
    INCEPTION_FILE,
    CLIPFeatures,
    FeatureExtractor,
    InceptionFeatures,
    MissingWeightsError,
    XRVFeatures,
)

PROTOCOLS = ("torch-fidelity", "clean-fid", "torchmetrics")

# Where clean-fid keeps the TorchScript Inception it downloads (StyleGAN2-ADA's conversion of the
# TensorFlow FID graph): /tmp on Linux and macOS. Its wrapper loads it by this file name.
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_INCEPTION = Path("/tmp") / CLEANFID_INCEPTION_FILE

# clean-fid's CLIP resize (`img_preprocess_clip`) produces 224 x 224 images, ViT-B/32's input.
CLEANFID_CLIP_SIZE = 224
# RoentGen compares at most this many images per side (`--n_images` of its calculate_fid.py).
ROENTGEN_IMAGES = 5000

ImagePath = str | os.PathLike


class ProtocolFeatures:
    """Image files -> features [N, D] float64, by one FID protocol; `label` says exactly how
    (keys: protocol, extractor, weights, preprocessing)."""

    label: dict

    def features(self, paths: Sequence[ImagePath]) -> np.ndarray:
        raise NotImplementedError


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stacked(batches: list[np.ndarray]) -> np.ndarray:
    if not batches:
        raise ValueError("no images given")
    return np.concatenate(batches).astype(np.float64)


def _medsd_reading(size: int | None) -> str:
    reading = "files read by medsd's load_uint8 (8-bit RGB, EXIF rotation applied, 16-bit scaled to 8 bits)"
    if size is None:
        return f"{reading}, no resize before the network (all images one size)"
    return f"{reading}, PIL bicubic resize of the shorter side to {size} and centre crop to {size}x{size}"


CLEANFID_READING = (
    "files read by clean-fid (PIL Image.open(path).convert('RGB'): no EXIF rotation, "
    "16-bit files clipped at 255 by Pillow)"
)
CLEANFID_RESIZE = (
    "clean-fid mode=clean: PIL bicubic resize to 299x299 (aspect not kept) of each channel in float32, "
    "clipped to [0, 255], not re-quantised"
)


class TorchFidelityProtocol(ProtocolFeatures):
    """medsd's own FID pipeline: an extractor (`InceptionFeatures`, torch-fidelity's network and
    resize) on the images as `load_uint8(paths, size)` reads them, a batch of files at a time."""

    def __init__(self, extractor: FeatureExtractor, size: int | None = None, batch_size: int = 32):
        self.extractor, self.size, self.batch_size = extractor.eval(), size, batch_size
        self.label = {
            "protocol": "torch-fidelity",
            "extractor": f"{extractor.label['extractor']}, torch-fidelity {version('torch-fidelity')}",
            "weights": extractor.label["weights"],
            "preprocessing": f"{_medsd_reading(size)}; {extractor.label['preprocessing']}"
            + (" (aspect not kept)" if isinstance(extractor, InceptionFeatures) else ""),
        }

    def features(self, paths: Sequence[ImagePath]) -> np.ndarray:
        from .suite import load_uint8  # here: the suite may import this module

        batches, shapes = [], set()
        for batch in _batches(list(paths), self.batch_size):
            images = load_uint8(batch, self.size)
            shapes.add(tuple(images.shape[1:]))
            if len(shapes) > 1:
                raise ValueError(f"images of different sizes {sorted(shapes)}: give a common size")
            batches.append(self.features_of_uint8(images))
        return _stacked(batches)

    def features_of_uint8(self, images: torch.Tensor) -> np.ndarray:
        """The features of images already read as `load_uint8(paths, size)` reads them (an
        evaluation's shared image set, so the files are not decoded again)."""
        from .suite import extract

        return extract(self.extractor, images, self.batch_size).astype(np.float64)


class CleanFIDProtocol(ProtocolFeatures):
    """Features through clean-fid's own `get_files_features` (mode "clean", no worker processes).

    network: what clean-fid calls on each batch, a float32 tensor [B, 3, 299, 299] in [0, 255]
        after its resize (or whatever `resize` returns), as its `custom_feat_extractor`.
    resize: clean-fid's `custom_fn_resize`, replacing its 299 resize (CLIP), or None.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        label: dict,
        resize: Callable[[np.ndarray], np.ndarray] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        self.network, self.resize, self.batch_size = network, resize, batch_size
        self.device = torch.device(device)
        self.label = {"protocol": "clean-fid", **label}

    def features(self, paths: Sequence[ImagePath]) -> np.ndarray:
        from cleanfid.fid import get_files_features

        for path in paths:
            if not isinstance(path, str | os.PathLike):
                raise TypeError(f"clean-fid reads image files; got {type(path).__name__}")
        if not paths:
            raise ValueError("no images given")
        features = get_files_features(
            [str(path) for path in paths],
            model=self.network,
            num_workers=0,
            batch_size=self.batch_size,
            device=self.device,
            mode="clean",
            custom_fn_resize=self.resize,
            verbose=False,
        )
        return features.astype(np.float64)


class TorchmetricsProtocol(ProtocolFeatures):
    """Features from a torchmetrics `FrechetInceptionDistance`'s own extractor (`metric.inception`,
    the call its `update` makes), fed the uint8 images `load_uint8(paths, size)` reads."""

    def __init__(self, metric: nn.Module, label: dict, size: int | None = None, batch_size: int = 32):
        self.metric, self.size, self.batch_size = metric, size, batch_size
        self.label = {"protocol": "torchmetrics", **label}

    @torch.no_grad()
    def features(self, paths: Sequence[ImagePath]) -> np.ndarray:
        from .suite import load_uint8

        return _stacked([self.features_of_uint8(load_uint8(batch, self.size))
                         for batch in _batches(list(paths), self.batch_size)])  # fmt: skip

    @torch.no_grad()
    def features_of_uint8(self, images: torch.Tensor) -> np.ndarray:
        """The features of images already read as `load_uint8(paths, size)` reads them."""
        batches = []
        for batch in _batches(images, self.batch_size):
            features = self.metric.inception(batch.to(self.metric.device)).double()
            batches.append((features.unsqueeze(0) if features.dim() == 1 else features).cpu().numpy())
        return _stacked(batches)


def _torch_fidelity_weights(weights: str | os.PathLike | None) -> Path:
    return Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def torch_fidelity_inception(
    weights: str | os.PathLike | None = None,
    model: FeatureExtractor | None = None,
    size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> TorchFidelityProtocol:
    """torch-fidelity's Inception (`InceptionFeatures`, from its weight file or already built)."""
    extractor = model if model is not None else InceptionFeatures(str(_torch_fidelity_weights(weights)))
    return TorchFidelityProtocol(extractor.to(device), size, batch_size)


def _cleanfid_inception(path: Path) -> nn.Module:
    from cleanfid.downloads_helper import inception_url
    from cleanfid.inception_torchscript import InceptionV3W

    if not path.is_file():
        default = f" (or to {CLEANFID_INCEPTION}, where clean-fid keeps it)"
        elsewhere = "" if path == CLEANFID_INCEPTION else default
        raise MissingWeightsError(
            f"clean-fid's Inception not found at {path}: download {inception_url} to that path{elsewhere}, "
            "or give the path of the file"
        )
    if path.name != CLEANFID_INCEPTION_FILE:
        raise ValueError(
            f"clean-fid's wrapper loads its Inception as {CLEANFID_INCEPTION_FILE}: rename {path}"
        )
    return InceptionV3W(str(path.parent), download=False, resize_inside=False).eval()


def clean_fid_inception(
    weights: str | os.PathLike | None = None,
    model: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> CleanFIDProtocol:
    """clean-fid's FID (mode "clean"): its TorchScript Inception, read from `weights` (default
    /tmp/inception-2015-12-05.pt, where clean-fid downloads it), through clean-fid's `InceptionV3W`,
    which normalises (x - 128) / 128 itself. `model`, given instead, is called as clean-fid's
    `custom_feat_extractor` on the resized float batch [B, 3, 299, 299] in [0, 255]."""
    if model is None:
        path = Path(weights) if weights else CLEANFID_INCEPTION
        model, extractor, source = _cleanfid_inception(path).to(device), "TorchScript Inception", str(path)
        extractor += " (inception-2015-12-05.pt, the TF FID graph), 2048-d pool, (x - 128) / 128 inside"
    else:
        extractor, source = "given network on the 299x299 float batch", "given network"
    return CleanFIDProtocol(
        model,
        {
            "extractor": f"clean-fid {version('clean-fid')} {extractor}",
            "weights": source,
            "preprocessing": f"{CLEANFID_READING}; {CLEANFID_RESIZE}",
        },
        device=device,
        batch_size=batch_size,
    )


def _cleanfid_clip_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's CLIP resize (`img_preprocess_clip`), which RoentGen passes as clean-fid's
    `custom_fn_resize`, so it replaces the 299 resize: uint8 RGB, torchvision bicubic resize of the
    shorter side to 224 on the PIL image, centre crop to 224 x 224, back to uint8. Rewritten here
    because clean-fid's module imports OpenAI's `clip` package, which medsd does not install."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pil = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    pil = TF.resize(pil, CLEANFID_CLIP_SIZE, interpolation=InterpolationMode.BICUBIC)
    pil = TF.center_crop(pil, CLEANFID_CLIP_SIZE)
    return np.asarray(pil).clip(0, 255).astype(np.uint8)


class CleanFIDCLIPNetwork(nn.Module):
    """clean-fid's `CLIP_fx` on an open_clip model: x / 255, normalised with CLIP's mean and std,
    the image embedding as it comes, NOT L2-normalised (unlike medsd's `CLIPFeatures`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import open_clip

        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image((images / 255 - self.mean) / self.std).float()


def clean_fid_clip(
    weights: str | None = None,
    model: nn.Module | None = None,
    model_name: str = "ViT-B-32-quickgelu",
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> CleanFIDProtocol:
    """RoentGen's CLIP FID: clean-fid's CLIP feature extractor (ViT-B/32 of OpenAI's `clip`
    package) mirrored with open_clip. `weights`: an open_clip weight file or cached tag ('openai');
    the default model name has OpenAI's QuickGELU, which OpenAI's ViT-B/32 weights need."""
    clip = CLIPFeatures(model_name, pretrained=weights, model=model)
    if clip.size != CLEANFID_CLIP_SIZE:
        raise ValueError(
            f"clean-fid's CLIP resize gives 224x224 images, open_clip {model_name} takes {clip.size}"
        )
    name = "given open_clip model" if model is not None else f"open_clip {model_name}"
    return CleanFIDProtocol(
        CleanFIDCLIPNetwork(clip.net).to(device),
        {
            "extractor": (
                f"clean-fid {version('clean-fid')} CLIP feature extractor (CLIP_fx, ViT-B/32) mirrored with "
                f"{name} in float32 (OpenAI's clip package is not installed; on CUDA it runs in float16), "
                "image embedding NOT L2-normalised"
            ),
            "weights": str(weights) if model is None else "given model",
            "preprocessing": (
                f"{CLEANFID_READING}; clean-fid's CLIP resize in place of the 299 resize "
                "(img_preprocess_clip): torchvision bicubic resize of the shorter side to 224, "
                "centre crop to 224x224, uint8; x / 255, CLIP mean/std"
            ),
        },
        resize=_cleanfid_clip_resize,
        device=device,
        batch_size=batch_size,
    )


class RoentGenXRVNetwork(nn.Module):
    """RoentGen's in-domain extractor on clean-fid's 299 x 299 float batch in [0, 255]:
    torchvision's `rgb_to_grayscale` (0.2989 R + 0.587 G + 0.114 B), scaled to [-1024, 1024]
    (2048 x / 255 - 1024, torchxrayvision's range), torchvision's bilinear resize to 224, then the
    DenseNet's `features2` (ReLU and global average pool of the last block, 1024-d).

    RoentGen's centre crop before the resize is left out: on a square 299 x 299 batch it keeps
    everything. Its `transforms.Resize(224)` antialiases on torchvision >= 0.17 and did not before;
    `antialias` chooses (default: what the script does on the torchvision installed today).
    """

    def __init__(self, model: nn.Module, antialias: bool = True):
        super().__init__()
        self.model, self.antialias = model.eval(), antialias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        x = 2048 * (TF.rgb_to_grayscale(images) / 255) - 1024
        x = TF.resize(x, [224, 224], antialias=self.antialias)
        return self.model.features2(x)


def clean_fid_xrv(
    weights: str | None = None,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    antialias: bool = True,
) -> CleanFIDProtocol:
    """RoentGen's domain FID: torchxrayvision's DenseNet-121 (`densenet121-res224-all`, from the
    folder `weights` or torchxrayvision's cache, or a `model` given) after clean-fid's 299 resize."""
    xrv = XRVFeatures(weights_dir=weights, model=model)
    return CleanFIDProtocol(
        RoentGenXRVNetwork(xrv.net, antialias).to(device),
        {
            "extractor": f"clean-fid {version('clean-fid')}, {xrv.label['extractor']} (RoentGen's script)",
            "weights": xrv.label["weights"],
            "preprocessing": (
                f"{CLEANFID_READING}; {CLEANFID_RESIZE}; torchvision rgb_to_grayscale "
                "(0.2989 R + 0.587 G + 0.114 B), 2048 x / 255 - 1024, torchvision bilinear resize to "
                f"224x224 (antialias={antialias})"
            ),
        },
        device=device,
        batch_size=batch_size,
    )


def torchmetrics_inception(
    weights: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    antialias: bool = True,
) -> TorchmetricsProtocol:
    """torchmetrics' FID: `FrechetInceptionDistance(feature=2048, normalize=False, antialias=...,
    feature_extractor_weights_path=weights)` (torch-fidelity's weight file, by default where
    `InceptionFeatures` looks for it), or `FrechetInceptionDistance(feature=model)`, a custom
    network that torchmetrics feeds the uint8 images as they are.

    Images are given as uint8 (normalize=False): with normalize=True torchmetrics turns [0, 1]
    floats into bytes with (x * 255).byte(), which truncates rather than rounds, so it is not used.
    The network runs in float32, torchmetrics' default (`set_dtype(torch.float64)` not applied).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if model is None:
        path = _torch_fidelity_weights(weights)
        if not path.is_file():
            raise MissingWeightsError(
                f"Inception weights not found at {path}: download {INCEPTION_FILE} from torch-fidelity's "
                f"releases into {path.parent}, or give its path"
            )
        check_state_dict(path)  # torchmetrics reads it with torch-fidelity's full unpickler
        metric = FrechetInceptionDistance(
            feature=2048, normalize=False, feature_extractor_weights_path=str(path), antialias=antialias
        )
        extractor = "torchmetrics NoTrainInceptionV3 (torch-fidelity's network, TF FID weights), 2048-d pool"
        resize = (
            "bilinear resize to 299x299 (aspect not kept) with antialias=True (torchmetrics >= 1.8 default; "
            "torch-fidelity's TF-compatible resize does not antialias)"
            if antialias
            else "torch-fidelity's TF-compatible bilinear resize to 299x299 (aspect not kept, no antialias)"
        )
        preprocessing, source = f"{resize}, (x - 128) / 128, network in float32", str(path)
    else:
        metric = FrechetInceptionDistance(feature=model, normalize=False)
        extractor, source = "given feature module", "given model"
        preprocessing = "the uint8 images as they are"
    return TorchmetricsProtocol(
        metric.to(device),
        {
            "extractor": f"torchmetrics {version('torchmetrics')} FrechetInceptionDistance: {extractor}",
            "weights": source,
            "preprocessing": (
                f"{_medsd_reading(size)}; uint8 input (normalize=False: torchmetrics' normalize=True float "
                f"input truncates with (x * 255).byte() instead of rounding, not used); {preprocessing}"
            ),
        },
        size,
        batch_size,
    )


_BUILDERS: dict[tuple[str, str], Callable[..., ProtocolFeatures]] = {
    ("torch-fidelity", "inception"): torch_fidelity_inception,
    ("clean-fid", "inception"): clean_fid_inception,
    ("clean-fid", "clip"): clean_fid_clip,
    ("clean-fid", "xrv"): clean_fid_xrv,
    ("torchmetrics", "inception"): torchmetrics_inception,
}
EXTRACTORS = {protocol: tuple(e for p, e in _BUILDERS if p == protocol) for protocol in PROTOCOLS}


def fid_protocol(protocol: str, extractor: str = "inception", **options) -> ProtocolFeatures:
    """The feature pipeline of `protocol` with `extractor` (see EXTRACTORS).

    options (all optional, passed to the builder): weights (a weight file; xrv: the folder holding
    it), model (a network given instead of weights: tests), device, batch_size; size (the common
    resolution the files are read at) for torch-fidelity and torchmetrics only: clean-fid resizes
    each file straight to its network's input; antialias (torchmetrics, xrv), model_name (clip).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol '{protocol}': choose from {', '.join(PROTOCOLS)}")
    if (protocol, extractor) not in _BUILDERS:
        choices = ", ".join(EXTRACTORS[protocol])
        raise ValueError(f"the {protocol} protocol has no '{extractor}' extractor: choose from {choices}")
    if protocol == "clean-fid" and options.pop("size", None) is not None:
        raise ValueError(
            "clean-fid resizes each file straight to its network's input (299x299; CLIP: 224x224), "
            "a common size does not apply"
        )
    return _BUILDERS[protocol, extractor](**options)


def roentgen_selection(
    paths: Sequence,
    prompt_index: Sequence[int] | None = None,
    limit: int = ROENTGEN_IMAGES,
    seed: int | None = None,
) -> list:
    """The images RoentGen's FID compares, from one side (generated, or real).

    RoentGen's eval/calculate_fid.py (github.com/StanfordMIMI/RoentGen, commit 05585a7) lists the
    generated folder with the pattern "*_0.jpg", the first image of each prompt, and the real
    folder with "*.jpg" (or a CSV's Path column), then keeps the first `--n_images` (5,000) of each
    list: `flist[:min(len(flist), n_images)]`. There is no random subset (its seed only seeds
    `accelerate`); which 5,000 come first is the order of the listing, which `Path.glob` leaves to
    the file system. Here:

    prompt_index: each image's prompt (a manifest's prompt_index); given, only the first image of
        each prompt in the order of `paths` (image k = 0 of a `medsd sample` manifest) is kept.
    seed: None keeps the first `limit` in the order of `paths`, as the script does with its
        listing. An int draws a seeded random `limit` instead (kept in their order), for paths in
        a meaningful order (sorted by patient, say) that the script's arbitrary listing would not
        have had.
    """
    chosen = list(paths)
    if prompt_index is not None:
        if len(prompt_index) != len(chosen):
            raise ValueError(f"{len(chosen)} paths but {len(prompt_index)} prompt indices")
        first: dict[int, object] = {}
        for path, index in zip(chosen, prompt_index, strict=True):
            first.setdefault(index, path)
        chosen = list(first.values())
    if seed is not None and len(chosen) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False))
        return [chosen[i] for i in keep]
    return chosen[:limit]
