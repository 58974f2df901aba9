"""Colonoscopy phantoms in the ImageCLEFmed MEDVQA-GI 2024 development-set layout.

A frame looks like a colonoscope's: pink mucosa with vessels and ring-shaped folds around a dark
lumen, bright wet-surface reflections, vignetting and black rounded corners. Polyps (0 to 3) are
shaded domes whose radius follows their size class; an instrument is a grey metallic coil
entering from an edge. Every prompt and caption is generated from what was drawn.

Layout written: `prompt-gt.csv` (`Prompt;Filename`, several prompts per image),
`images/<id>.jpg` with 25-character lowercase ids, `kvasir-captions.json`
(`{id: {"captions": [...]}}`, id without extension) and `phantom_truth.csv`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._common import disc, grid, random_id, save_jpeg, smooth_noise, soft, write_csv

SIZE_CLASSES = ("<5mm", "5-10mm", "11-20mm", ">20mm")
# Radius range (image widths) per size class: the scope sees roughly 6 cm across.
POLYP_RADIUS = {
    "<5mm": (0.03, 0.045),
    "5-10mm": (0.055, 0.08),
    "11-20mm": (0.09, 0.125),
    ">20mm": (0.15, 0.19),
}
LOCATIONS = (  # row by row, as a 3x3 grid over the image
    "upper-left", "upper-center", "upper-right", "center-left", "center", "center-right",
    "lower-left", "lower-center", "lower-right",
)  # fmt: skip
ASPECTS = (1.25, 1.17, 1.5)  # width / height: 720x576 and 1280x1024, 622x530, and wider frames
COUNT_WORDS = ("no", "one", "two", "three")


@dataclass(frozen=True)
class Polyp:
    size: str  # one of SIZE_CLASSES
    location: str  # one of LOCATIONS: the ninth of the image its centre is in


@dataclass(frozen=True)
class ColonFindings:
    polyps: tuple[Polyp, ...] = ()
    instrument: bool = False

    def __post_init__(self):
        if len(self.polyps) > 3 or len({p.location for p in self.polyps}) < len(self.polyps):
            raise ValueError("at most 3 polyps, each in a different location")
        for p in self.polyps:
            if p.size not in SIZE_CLASSES or p.location not in LOCATIONS:
                raise ValueError(f"polyp size must be in {SIZE_CLASSES} and location in {LOCATIONS}: {p}")


def sample_colon_findings(rng: np.random.Generator) -> ColonFindings:
    """Random findings: 70% of frames have polyps (as in the MEDVQA-GI prompts), 30% an instrument."""
    count = rng.choice(4, p=[0.3, 0.45, 0.17, 0.08])
    locations = rng.choice(LOCATIONS, size=count, replace=False)
    sizes = rng.choice(SIZE_CLASSES, size=count, p=[0.25, 0.35, 0.25, 0.15])
    polyps = tuple(Polyp(str(s), str(loc)) for s, loc in zip(sizes, locations, strict=True))
    return ColonFindings(polyps, instrument=bool(rng.random() < 0.3))


def draw_colonoscopy(
    findings: ColonFindings, width: int = 256, height: int | None = None, seed: int = 0
) -> Image.Image:
    """One RGB frame of `findings`; the scene (lumen, folds, lighting, colour) varies with `seed`."""
    rng = np.random.default_rng(seed)
    height = height or round(width / ASPECTS[0])
    x, y = grid(width, height)
    half_h = height / width / 2  # y runs over 0.5 +- half_h
    e = max(0.004, 1.5 / width)
    lx, ly = 0.5 + rng.uniform(-0.2, 0.2), 0.5 + rng.uniform(-0.6, 0.6) * half_h
    r = np.sqrt((x - lx) ** 2 + (y - ly) ** 2)
    lumen = np.exp(-((r / rng.uniform(0.12, 0.2)) ** 2))
    folds = 0.5 + 0.5 * np.sin(7 * np.log(r + 0.03) + 1.5 * smooth_noise(rng, width, height, 4))
    shade = (1 - 0.85 * lumen) * (0.6 + 0.4 * folds**2) * (0.75 + 0.25 * np.clip(r / 0.5, 0, 1))
    shade = shade * (1 + 0.05 * smooth_noise(rng, width, height, 30))
    vessels = soft(0.04 - np.abs(smooth_noise(rng, width, height, 14)), 0.04)
    base = (np.array([0.9, 0.5, 0.46]) + rng.uniform(-0.04, 0.04, size=3)).astype(np.float32)
    rgb = np.stack(
        [base[0] * (1 - 0.05 * vessels), *(base[1:, None, None] * (1 - 0.2 * vessels - 0.3 * lumen))]
    )
    rgb = rgb * shade
    for polyp in findings.polyps:
        rgb = _polyp(rgb, x, y, polyp, half_h, e, rng)
    glints = rng.integers(3, 9)
    for gx, gy in zip(
        rng.uniform(0.1, 0.9, glints), 0.5 + rng.uniform(-0.8, 0.8, glints) * half_h, strict=True
    ):
        rgb = np.maximum(rgb, 0.95 * disc(x, y, gx, gy, (rng.uniform(0.004, 0.012), 0.005), e))
    if findings.instrument:
        rgb = _instrument(rgb, x, y, half_h, e, rng)
    vignette = 1 - 0.2 * (((x - 0.5) / 0.5) ** 2 + ((y - 0.5) / half_h) ** 2)
    frame = soft(1 - ((np.abs(x - 0.5) / 0.5) ** 8 + (np.abs(y - 0.5) / half_h) ** 8), 0.05)
    rgb = rgb * vignette * frame + 0.01 * rng.standard_normal(rgb.shape, dtype=np.float32)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def _polyp(rgb, x, y, polyp: Polyp, half_h: float, e: float, rng) -> np.ndarray:
    """A lit dome with a slightly irregular outline, a shadow around it and a glint on top."""
    col, row = LOCATIONS.index(polyp.location) % 3, LOCATIONS.index(polyp.location) // 3
    px = (1 + 2 * col) / 6 + rng.uniform(-0.05, 0.05)
    py = 0.5 + ((1 + 2 * row) / 3 - 1 + rng.uniform(-0.1, 0.1)) * half_h
    radius = rng.uniform(*POLYP_RADIUS[polyp.size])
    angle = np.arctan2(y - py, x - px)
    outline = radius * (1 + 0.08 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.05 * np.sin(5 * angle))
    d = np.sqrt((x - px) ** 2 + (y - py) ** 2) / outline
    inside = soft((1 - d) * radius, e)
    z = np.sqrt(np.clip(1 - d**2, 0, 1))
    light = np.clip((-0.45 * (x - px) / radius - 0.45 * (y - py) / radius + 0.77 * z), 0, 1)
    color = np.array([0.92, 0.55, 0.48], dtype=np.float32)[:, None, None] * (0.5 + 0.65 * light)
    shadow = 1 - 0.4 * np.exp(-(((d - 1.08) / 0.1) ** 2)) * (1 - inside)
    rgb = rgb * shadow * (1 - inside) + color * inside
    return np.maximum(rgb, 0.95 * disc(x, y, px - 0.35 * radius, py - 0.35 * radius, 0.12 * radius, e))


def _instrument(rgb, x, y, half_h: float, e: float, rng) -> np.ndarray:
    """A grey metal coil (biopsy forceps or snare sheath) from the bottom or a side edge."""
    edge = rng.choice(["bottom", "left", "right"], p=[0.5, 0.2, 0.3])
    if edge == "bottom":
        start = np.array([rng.uniform(0.4, 0.9), 0.5 + 1.2 * half_h])
    else:
        start = np.array([-0.1 if edge == "left" else 1.1, 0.5 + rng.uniform(0.0, 0.8) * half_h])
    target = np.array([rng.uniform(0.35, 0.65), 0.5 + rng.uniform(-0.5, 0.3) * half_h])
    length = np.linalg.norm(target - start)
    u, width = (target - start) / length, rng.uniform(0.035, 0.05)
    along = (x - start[0]) * u[0] + (y - start[1]) * u[1]
    across = (-(x - start[0]) * u[1] + (y - start[1]) * u[0]) / width
    body = soft((1 - np.abs(across)) * width, e) * soft(length - along, e)
    body = np.maximum(body, disc(x, y, *target, width, e))  # rounded tip
    metal = (
        0.3 + 0.45 * np.sqrt(np.clip(1 - across**2, 0, 1)) + 0.35 * np.exp(-(((across + 0.35) / 0.15) ** 2))
    )
    metal = metal * (1 - 0.2 * np.cos(np.pi * along / 0.02) ** 8)  # coil windings
    grey = np.array([0.62, 0.63, 0.66], dtype=np.float32)[:, None, None] * metal
    return rgb * (1 - body) + grey * body


def prompts_for(findings: ColonFindings, rng: np.random.Generator) -> list[str]:
    """5 to 10 generation prompts true of the image, in the style of MEDVQA-GI's prompt-gt.csv,
    including its occasional slips (a doubled word, a missing capital and full stop)."""
    polyps, k = findings.polyps, len(findings.polyps)
    options = ["Generate a colonoscopy image.", "Generate an image of the colon."]
    if polyps:
        options += ["Generate an image containing a polyp.", "Generate an image with a polyp."]
        options.append(f"Generate an image with {k} polyp{'s' if k > 1 else ''}.")
        options += [f"Generate an image with a polyp of size {s}." for s in sorted({p.size for p in polyps})]
        options += [
            f"Generate an image with a polyp located in the {p.location} of the image." for p in polyps
        ]
        if rng.random() < 0.25:
            options.append("Generate an an image containing a polyp.")
        if rng.random() < 0.15:
            options.append(f"generate an image with {k} polyp{'s' if k > 1 else ''}")
    else:
        options += ["Generate an image with no polyps.", "Generate an image of the colon without polyps."]
        options.append("Generate an image of healthy colonic mucosa.")
    if findings.instrument:
        options += ["Generate an image containing an instrument.", "Generate an image with an instrument."]
        if polyps:
            options.append("Generate an image containing a polyp and an instrument.")
    else:
        options.append("Generate an image with no instruments.")
    count = min(len(options), int(rng.integers(5, 11)))
    return [str(p) for p in rng.choice(options, size=count, replace=False)]


def captions_for(findings: ColonFindings) -> list[str]:
    """Free-text descriptions of the image, as in Kvasir-style caption sets."""
    k = len(findings.polyps)
    tool = "A metal instrument is visible." if findings.instrument else "No instruments are visible."
    if not k:
        return [
            f"Colonoscopy image of normal-appearing colonic mucosa with no polyps. {tool}",
            f"An endoscopic view of the colon without any polyps. {tool}",
        ]
    each = " and ".join(f"a {p.size} polyp in the {p.location}" for p in findings.polyps)
    noun, sizes = ("polyp" if k == 1 else "polyps"), ", ".join(p.size for p in findings.polyps)
    return [
        f"Colonoscopy image showing {COUNT_WORDS[k]} {noun}: {each}. {tool}",
        f"An endoscopic view of the colon with {k} {noun} (sizes {sizes}). {tool}",
    ]


def write_medvqa_gi(out: Path, n: int, seed: int, image_size: int) -> None:
    """`n` frames `image_size` wide, with their prompts, captions and truth, into `out`."""
    rng = np.random.default_rng(seed)
    prompts, captions, truth = [], {}, []
    while len(truth) < n:
        image_id = random_id(rng, 25, first="c")
        if image_id in captions:
            continue
        findings = sample_colon_findings(rng)
        height = round(image_size / ASPECTS[rng.choice(3, p=[0.6, 0.25, 0.15])])
        save_jpeg(
            draw_colonoscopy(findings, image_size, height, seed=int(rng.integers(2**63))),
            out / "images" / f"{image_id}.jpg",
        )
        prompts += [(prompt, f"{image_id}.jpg") for prompt in prompts_for(findings, rng)]
        captions[image_id] = {"captions": captions_for(findings)}
        truth.append(
            {
                "path": f"images/{image_id}.jpg",
                "image_id": image_id,
                "width": image_size,
                "height": height,
                "n_polyps": len(findings.polyps),
                "polyp_sizes": ";".join(p.size for p in findings.polyps),
                "polyp_locations": ";".join(p.location for p in findings.polyps),
                "instrument": findings.instrument,
            }
        )
    write_csv(pd.DataFrame(prompts, columns=["Prompt", "Filename"]), out / "prompt-gt.csv", sep=";")
    (out / "kvasir-captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    write_csv(pd.DataFrame(truth), out / "phantom_truth.csv")
