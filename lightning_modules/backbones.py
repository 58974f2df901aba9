"""What every model family's loading shares: where a backbone comes from (`BackboneSpec`), the
names of the built-in models (`medsd/...`: tiny models built from config, no download, for tests
and demos; the shipped demo base), the "not found" message, and the tiny building blocks (CLIP
tokenizer and text encoder, VAE). Domain text encoders (a biomedical BERT, ...) load here too.
Each family's own parts load in its file under `families/`.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

TINY_SD = "medsd/tiny-sd"
TINY_SD2 = "medsd/tiny-sd2"  # the same size, shaped like Stable Diffusion 2.x (v-prediction)
TINY_SDXL = "medsd/tiny-sdxl"  # shaped like SDXL: see lightning_modules/families/sdxl.py
TINY_FLUX = "medsd/tiny-flux"  # shaped like FLUX.1-dev: see lightning_modules/families/flux.py
TINY_KANDINSKY = "medsd/tiny-kandinsky"  # see lightning_modules/families/kandinsky.py
# The demo's base model: tiny-SD-shaped, pretrained on generated scenes by
# experiments/pretrain_demo_base.py, shipped as a diffusers folder inside this package.
DEMO_BASE = "medsd/demo-base"
DEMO_BASE_DIR = Path(__file__).resolve().parent / "demo_base"
TINY_BERT = "medsd/tiny-bert"
TINY_CLIP = "medsd/tiny-clip"  # the tiny backbone's CLIP text encoder and tokenizer on their own


class BackboneNotFoundError(RuntimeError):
    """Weights could not be found or fetched; the message says how to provide them."""


@dataclass
class BackboneSpec:
    """Where a Stable Diffusion-family model comes from.

    name_or_path: a hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`,
        `stabilityai/stable-diffusion-2-1`), a local diffusers folder, or `medsd/tiny-sd` /
        `medsd/tiny-sd2` (built from config, random weights, no download).
    prediction_type: override the scheduler's `epsilon` / `v_prediction`; None keeps the model's.
    dtype: read the weights in this dtype ("bfloat16" / "float16"; None: fp32). It halves the host
        memory a large model takes while loading (FLUX.1-dev: about 34 instead of 67 GB per
        rank); the weights a strategy trains are made fp32 again, and the run needs the matching
        mixed precision (bf16-mixed / 16-mixed).
    random_init: build every part from the architecture config shipped for `name_or_path`
        (`lightning_modules/architectures`) with random weights (deterministic), no download:
        the real architecture, for trying a config's size, memory and speed without its weights.
        A name without a shipped architecture is an error that lists the shipped ones.
    architecture_overrides: with random_init, part -> settings replacing the published ones,
        e.g. `{"transformer": {"num_layers": 1, "num_single_layers": 1}}` (fewer blocks where the
        full model does not fit in memory; keep widths, heads and sequence lengths).
    """

    name_or_path: str = TINY_SD
    revision: str | None = None
    variant: str | None = None
    prediction_type: str | None = None
    dtype: Literal["bfloat16", "float16"] | None = None
    random_init: bool = False
    architecture_overrides: dict[str, dict] | None = None

    def architecture(self):
        """The shipped architecture of `name_or_path` (with the overrides)."""
        from .architectures import architecture

        return architecture(self.name_or_path, self.architecture_overrides)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.dtype) if self.dtype else None


def random_base(manifest: dict) -> dict:
    """The random_init settings an export's manifest records for its base model ({} if none), so
    that a delta export of a random-init run applies to the same random base (built again)."""
    if not manifest.get("base_random_init"):
        return {}
    return {"random_init": True, "architecture_overrides": manifest.get("base_architecture_overrides")}


def random_base_fields(spec: BackboneSpec) -> dict:
    """The manifest fields `random_base` reads back ({} for pretrained weights)."""
    if not spec.random_init:
        return {}
    return {"base_random_init": True, "base_architecture_overrides": spec.architecture_overrides}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _not_found(what: str, name_or_path: str, error: Exception) -> BackboneNotFoundError:
    mode = "offline (HF_HUB_OFFLINE is set)" if offline() else "online"
    return BackboneNotFoundError(
        f"Could not load {what} '{name_or_path}' ({mode}): {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}\n"
        f"To use it without network, download it once where the hub is reachable, e.g. "
        f"`hf download {name_or_path} --local-dir /models/{name_or_path.split('/')[-1]}`, copy "
        f"that folder here and pass the folder path instead of the id (or point HF_HOME at a "
        f"cache that holds it)."
    )


def local_name(name_or_path: str) -> str:
    """A built-in folder's path for its `medsd/...` name (the demo base); anything else as it is."""
    return str(DEMO_BASE_DIR) if name_or_path == DEMO_BASE else name_or_path


def build_sampler(sampler_config: dict, name: str | None = None):
    """The scheduler class named in the config (or `name`, e.g. `DDIMScheduler`) from it."""
    cls = getattr(diffusers, name or sampler_config["_class_name"])
    return cls.from_config(sampler_config)


# --- tiny backbone --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's byte-level BPE vocabulary, rebuilt from the merges file open_clip ships.

    CLIP's vocabulary is: the 256 byte symbols, the same with the end-of-word marker, one entry
    per merge in order, then the two special tokens (49,408 entries in all).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1])  # line 0: header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A real CLIP tokenizer built offline (same ids as open_clip's and OpenAI's)."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def tiny_clip_text_config(tokenizer: CLIPTokenizer, **config) -> CLIPTextConfig:
    """The tiny models' CLIP text encoder: 2 layers of width 32 over the real CLIP vocabulary, with
    the tokenizer's special tokens; `config` adds or overrides settings (width, projection, ...)."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**settings, **config})


def build_tiny_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """The tiny models' VAE: 32 px images, 2x downsampling, widths 16 and 32 (random weights from
    the caller's RNG state); `config` adds family-specific settings (scaling and shift factors)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


# --- domain text encoders -------------------------------------------------------------------


def load_text_encoder(
    name_or_path: str, revision: str | None = None, random_init: bool = False
) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    """Any transformers encoder (e.g. a biomedical BERT) with its tokenizer, or `medsd/tiny-bert`.
    With `random_init`, its shipped architecture with random weights and, as the vocabulary
    files are not shipped, the tiny BERT's character tokenizer as a stand-in (its ids are a
    subset of any BERT vocabulary's range)."""
    if name_or_path == TINY_BERT:
        return build_tiny_bert()
    if random_init:
        from .architectures import architecture

        return build_character_tokenizer(), architecture(name_or_path).build("text_encoder", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        model = AutoModel.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise _not_found("the text encoder", name_or_path, error) from error
    return tokenizer, model


def load_clip_text_encoder(
    name_or_path: str, revision: str | None = None, random_init: bool = False
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A CLIP text encoder and its tokenizer from a transformers CLIP folder or hub id (e.g.
    `openai/clip-vit-large-patch14`), or `medsd/tiny-clip`; with `random_init`, its shipped
    architecture with random weights and CLIP's real tokenizer."""
    if name_or_path == TINY_CLIP:
        from .families.stable_diffusion import build_tiny_backbone  # (that module imports this one)

        tiny = build_tiny_backbone()
        return tiny.tokenizer, tiny.text_encoder
    if random_init:
        from .architectures import architecture

        shipped = architecture(name_or_path)
        return shipped.clip_tokenizer(), shipped.build("text_encoder", CLIPTextModel)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, revision=revision)
        model = CLIPTextModel.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise _not_found("the CLIP text encoder", name_or_path, error) from error
    return tokenizer, model


def build_character_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer whose vocabulary is characters, so any English text tokenises."""
    import string

    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in pieces)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def build_tiny_bert(seed: int = 0) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    """A 2-layer BERT over `build_character_tokenizer`'s vocabulary."""
    tokenizer = build_character_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=24,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=128,
            )
        )
    return tokenizer, model
