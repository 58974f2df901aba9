"""DINOv2 and RAD-DINO image features: the CLS token of a DINOv2 vision transformer.

Stein et al. ("Exposing flaws of generative model evaluation metrics and their unfair treatment of
diffusion models", NeurIPS 2023) found that FID and related metrics computed on DINOv2 ViT-L/14
features agree with human judgement of image realism far better than on Inception features;
`DINOv2Features` follows their protocol (their `dgm-eval` code): the CLS token of DINOv2 ViT-L/14
(Oquab et al., 2023) at 224 px with ImageNet mean/std. `RadDinoFeatures` is the chest X-ray
counterpart: RAD-DINO (Perez-Garcia et al., "Exploring scalable medical image encoders beyond
text supervision", Nature Machine Intelligence 2025; `microsoft/rad-dino`), a DINOv2 ViT-B/14
trained on chest radiographs, with its own preprocessing at 518 px: the encoder CheXGenBench
computes its FID with.

Both load a transformers `Dinov2Model` and take its `pooler_output`: token 0 (CLS) of the last
hidden state after the final layernorm (`Dinov2Model.forward`: `sequence_output =
self.layernorm(...)`, `pooled_output = sequence_output[:, 0, :]`), the `x_norm_clstoken` of the
original DINOv2 code. The model is loaded in float32.

Preprocessing runs in torch on the uint8 [B, 3, H, W] tensor, on the device of the model: the
shorter side is resized to `size` (the longer to int(size * long / short), as transformers
computes it) with antialiased bicubic interpolation in float32, clamped to [0, 255] and rounded
back to 8-bit levels, centre-cropped to `crop_size` (offset int((side - crop) / 2)), divided by
255 and normalised by mean/std. The `label` spells out the settings and where each came from.
This is what transformers' image processor (`BitImageProcessor`, torchvision backend) does to a
uint8 tensor on a GPU, where torchvision resizes uint8 images exactly so; on a CPU torchvision
uses a native uint8 kernel, and dgm-eval uses PIL, both of which round between the horizontal and
vertical passes, a difference of about one 8-bit level on natural images. dgm-eval moreover
squashes every image to 224 x 224 without keeping its aspect ratio: the same for square images,
while ours crops a non-square one.

Weights are never downloaded: `name_or_path` is a local folder (a `save_pretrained` or
`hf download --local-dir` folder) or a hub id already in the local Hugging Face cache; otherwise
`MissingWeightsError` says how to put the folder in place and which flag passes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .features import FeatureExtractor, MissingWeightsError

DINOV2_MODEL = "facebook/dinov2-large"
RADDINO_MODEL = "microsoft/rad-dino"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEIN_SIZE = 224
# RAD-DINO settings used when the model folder has no preprocessor_config.json. They are those of
# microsoft/rad-dino's BitImageProcessor config as found mirrored in third-party code (shortest
# edge 518, bicubic, centre crop 518 x 518, mean 0.5307 and std 0.2583 on every channel), in line
# with the model's config.json (image_size 518) and its 37 x 37 patch grid (518 / 14); the hub
# file itself could not be read here, so these are chosen defaults, and the folder's own
# preprocessor_config.json, when present, takes precedence.
RADDINO_SIZE = 518
RADDINO_MEAN = (0.5307, 0.5307, 0.5307)
RADDINO_STD = (0.2583, 0.2583, 0.2583)
PROCESSOR_CONFIG = "preprocessor_config.json"


def resolve_model_folder(name_or_path: str, what: str, flag: str, default_id: str) -> Path:
    """The folder of a transformers model: `name_or_path` itself, or a hub id's cached snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingWeightsError(
                f"{what} folder {path} has no config.json: put a transformers model folder there "
                f"(e.g. `hf download {default_id} --local-dir {path}`) and pass it with {flag} DIR"
            )
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as error:  # not cached, or not a valid hub id (HFValidationError, ...)
        raise MissingWeightsError(
            f"{what} weights not found: '{name_or_path}' is neither a local folder nor a model in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}), and weights are never downloaded here. "
            f"On a machine with network access run `hf download {default_id} --local-dir DIR`, copy "
            f"DIR here and pass it with {flag} DIR ({type(error).__name__})"
        ) from error
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"the cached snapshot {folder} of {name_or_path} has no config.json; pass a complete "
            f"{what} folder with {flag} DIR"
        )
    return folder


def load_dinov2(folder: Path, what: str, flag: str):
    """A float32 `Dinov2Model` from a local folder, offline."""
    from transformers import AutoModel, Dinov2Model

    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as error:  # missing or unreadable weight files
        raise MissingWeightsError(
            f"{what} could not be loaded from {folder} ({error}); pass a complete model folder with "
            f"{flag} DIR"
        ) from error
    if not isinstance(model, Dinov2Model):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not a Dinov2Model")
    return model.eval()


def read_processor_config(folder: Path) -> dict | None:
    """Resize / crop / mean / std of the folder's image processor config, or None without one.

    Only the pipeline implemented here is accepted (bicubic resize of the shortest edge, centre
    crop, rescale by 1/255, normalise); any other setting raises rather than being ignored.
    """
    path = folder / PROCESSOR_CONFIG
    if not path.is_file():
        return None
    config = json.loads(path.read_text())

    def fail(what: str):
        return ValueError(f"{path}: {what} is not supported by this extractor; pass size/crop/mean/std")

    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if config.get(flag, True) is not True:
            raise fail(f"{flag}={config[flag]}")
    if config.get("resample", 3) != 3:
        raise fail(f"resample={config['resample']} (only 3, bicubic)")
    if abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise fail(f"rescale_factor={config['rescale_factor']}")
    size, crop = config.get("size"), config.get("crop_size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(size, dict) or set(size) != {"shortest_edge"}:
        raise fail(f"size={size}")
    if not isinstance(crop, dict) or crop.get("height") != crop.get("width") or crop.get("height") is None:
        raise fail(f"crop_size={crop}")
    settings = {"size": int(size["shortest_edge"]), "crop_size": int(crop["height"])}
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key in config:
            values = config[key]
            values = [values] * 3 if isinstance(values, (int, float)) else list(values)
            if len(values) != 3:
                raise fail(f"{key}={config[key]}")
            settings[name] = tuple(float(v) for v in values)
    return settings


class _DinoCLSFeatures(FeatureExtractor):
    """A `Dinov2Model`'s `pooler_output` (CLS after the final layernorm) on preprocessed uint8 images."""

    def __init__(
        self,
        model,
        folder: Path,
        name: str,
        size: int,
        crop_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        sources: str,
    ):
        super().__init__()
        if crop_size > size:
            raise ValueError(f"crop size {crop_size} is larger than the resized shorter side {size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (std positive), got {mean}, {std}")
        self.net = model
        self.size, self.crop_size = int(size), int(crop_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        config = model.config
        self.label = {
            "extractor": (
                f"{name} (Dinov2Model, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                f"patch {config.patch_size}) CLS token after the final layernorm (pooler_output), "
                f"{config.hidden_size}-d"
            ),
            "weights": str(folder),
            "preprocessing": (
                f"torch bicubic antialiased resize of the shorter side to {self.size} (longer side "
                f"int({self.size} * long / short)), rounded to 8-bit levels, centre crop "
                f"{self.crop_size}x{self.crop_size}, /255, mean {tuple(mean)} std {tuple(std)} ({sources})"
            ),
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float32 [B, 3, crop, crop] on the model's device."""
        x = images.to(self.mean.device).float()
        height, width = x.shape[-2:]
        if height <= width:
            size = (self.size, int(self.size * width / height))
        else:
            size = (int(self.size * height / width), self.size)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255).round()
        top = int((x.shape[-2] - self.crop_size) / 2)
        left = int((x.shape[-1] - self.crop_size) / 2)
        x = x[..., top : top + self.crop_size, left : left + self.crop_size]
        return (x / 255 - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=self.preprocess(images)).pooler_output.float()


class DINOv2Features(_DinoCLSFeatures):
    """DINOv2 CLS features as Stein et al. (NeurIPS 2023) compute them: ViT-L/14 at 224 px.

    `name_or_path`: a local model folder or a hub id already in the HF cache (default
    facebook/dinov2-large, ViT-L/14); CLI flag --dinov2-model DIR. The folder's image processor
    config is deliberately not used: facebook/dinov2-* ship the DINOv2 linear-probe pipeline
    (resize to 256, crop 224), while the metric's protocol is Stein et al.'s 224 px resize with
    ImageNet mean/std; pass size / crop_size / mean / std to change it.
    """

    def __init__(
        self,
        name_or_path: str = DINOV2_MODEL,
        size: int = STEIN_SIZE,
        crop_size: int = STEIN_SIZE,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        folder = resolve_model_folder(name_or_path, "DINOv2", "--dinov2-model", DINOV2_MODEL)
        model = load_dinov2(folder, "DINOv2", "--dinov2-model")
        chosen = (size, crop_size, tuple(mean), tuple(std)) == (
            STEIN_SIZE,
            STEIN_SIZE,
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
        sources = "Stein et al. / dgm-eval settings" if chosen else "settings passed by the caller"
        super().__init__(model, folder, "DINOv2", size, crop_size, tuple(mean), tuple(std), sources)


class RadDinoFeatures(_DinoCLSFeatures):
    """RAD-DINO (microsoft/rad-dino, DINOv2 ViT-B/14 on chest X-rays) CLS features, 768-d.

    `name_or_path`: a local model folder or a hub id already in the HF cache (default
    microsoft/rad-dino); CLI flag --raddino-model DIR. Each preprocessing setting left as None is
    read from the folder's preprocessor_config.json when it has one (the hub model's own
    processor), else set to the chosen defaults above (518 / 518 / 0.5307 / 0.2583); the label
    says which.
    """

    def __init__(
        self,
        name_or_path: str = RADDINO_MODEL,
        size: int | None = None,
        crop_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        folder = resolve_model_folder(name_or_path, "RAD-DINO", "--raddino-model", RADDINO_MODEL)
        model = load_dinov2(folder, "RAD-DINO", "--raddino-model")
        from_config = read_processor_config(folder) or {}
        defaults = {"size": RADDINO_SIZE, "crop_size": RADDINO_SIZE, "mean": RADDINO_MEAN, "std": RADDINO_STD}
        given = {"size": size, "crop_size": crop_size, "mean": mean, "std": std}
        settings, origin = {}, {}
        for key in defaults:
            if given[key] is not None:
                settings[key], origin[key] = given[key], "argument"
            elif key in from_config:
                settings[key], origin[key] = from_config[key], PROCESSOR_CONFIG
            else:
                settings[key], origin[key] = defaults[key], "default"
        sources = ", ".join(f"{key} from {origin[key]}" for key in defaults)
        super().__init__(
            model,
            folder,
            "RAD-DINO",
            settings["size"],
            settings["crop_size"],
            tuple(settings["mean"]),
            tuple(settings["std"]),
            sources,
        )
