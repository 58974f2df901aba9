"""Procedural chest radiographs whose findings are known exactly, for tests and evaluation.

Orientation: a frontal (PA or AP) radiograph is displayed as if facing the patient, so the
PATIENT's left is the IMAGE's right (x > 0.5): the heart bulges to the image's right and a
"left pleural effusion" is drawn at the bottom right of the image. Every side in this module is
the patient's side, as a report states it; `_image_sign` is the one place that converts.
A lateral view shows the patient facing the image's left (sternum left, spine right).

Drawing is analytic in coordinates of image widths (see `_common.grid`): densities in [0, 1]
(0 air, about 0.4 soft tissue, more for bone and devices) built from soft-edged shapes, then
windowed with a little jitter and grain into an 8-bit grayscale image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ._common import disc, grid, smooth_noise, soft, to_gray_image

SIZES = ("small", "moderate", "large")
SIDES = ("left", "right")
LOBES = ("upper", "lower")
DEVICES = ("endotracheal tube", "enteric tube", "right PICC line", "pacemaker")
VIEWS = ("PA", "AP", "LATERAL")
# How often `sample_findings` draws each finding: common enough that every one has positives
# to learn from in a few hundred images, as the labelled public datasets do not guarantee.
PREVALENCE = {"effusion": 0.4, "cardiomegaly": 0.25, "pneumothorax": 0.12, "nodule": 0.15, "devices": 0.2}
# Fluid height above the costophrenic angle (image widths); a meniscus climbs higher laterally.
EFFUSION_HEIGHT = {"small": 0.08, "moderate": 0.15, "large": 0.25}
CHEST_WIDTH_MM = 350  # the image width in millimetres, to size nodules
MAX_DRAW_SIDE = 1024


@dataclass(frozen=True)
class ChestFindings:
    """What one study shows; sides are the patient's.

    effusion_left, effusion_right: None or a size from SIZES.
    effusion_uncertain: the single effusion (small, one side) is drawn at half opacity and
        reported as "possible": a subtle finding a radiologist hedges on (CheXpert label -1).
    cardiomegaly: the heart is drawn wider (cardiothoracic ratio about 0.55 instead of 0.35).
    pneumothorax: None or the side of an apical pneumothorax (lucent rim, visible pleural line).
    nodule: None or the side of a lung nodule, in `nodule_lobe`, `nodule_mm` across.
    devices: names from DEVICES.
    """

    effusion_left: str | None = None
    effusion_right: str | None = None
    effusion_uncertain: bool = False
    cardiomegaly: bool = False
    pneumothorax: str | None = None
    nodule: str | None = None
    nodule_lobe: str = "upper"
    nodule_mm: int = 12
    devices: tuple[str, ...] = ()

    def __post_init__(self):
        for size in (self.effusion_left, self.effusion_right):
            if size not in (None, *SIZES):
                raise ValueError(f"effusion size must be None or one of {SIZES}, got {size!r}")
        if self.effusion_uncertain and sorted(self.effusions.values()) != ["small"]:
            raise ValueError("an uncertain effusion is a single small one")
        if self.pneumothorax not in (None, *SIDES) or self.nodule not in (None, *SIDES):
            raise ValueError(f"sides are None or one of {SIDES}")
        if self.nodule_lobe not in LOBES or not set(self.devices) <= set(DEVICES):
            raise ValueError(f"nodule_lobe must be one of {LOBES} and devices from {DEVICES}")

    @property
    def effusions(self) -> dict[str, str]:
        """Patient side -> size, for the sides that have an effusion."""
        sizes = {"left": self.effusion_left, "right": self.effusion_right}
        return {side: size for side, size in sizes.items() if size}

    @property
    def normal(self) -> bool:
        """No pathology. Devices do not count, as in CheXpert's "No Finding"."""
        return not (self.effusions or self.cardiomegaly or self.pneumothorax or self.nodule)


def sample_findings(rng: np.random.Generator) -> ChestFindings:
    """Random findings, each independently at its PREVALENCE rate."""
    effusions, uncertain = {}, False
    if rng.random() < PREVALENCE["effusion"]:
        kind = rng.choice(["left", "right", "both"], p=[0.35, 0.35, 0.3])
        for side in SIDES if kind == "both" else [kind]:
            effusions[side] = SIZES[rng.choice(3, p=[0.45, 0.35, 0.2])]
        if kind != "both" and rng.random() < 0.15:
            effusions[kind], uncertain = "small", True
    nodule = str(rng.choice(SIDES)) if rng.random() < PREVALENCE["nodule"] else None
    n_devices = rng.integers(1, 4) if rng.random() < PREVALENCE["devices"] else 0
    return ChestFindings(
        effusion_left=effusions.get("left"),
        effusion_right=effusions.get("right"),
        effusion_uncertain=uncertain,
        cardiomegaly=bool(rng.random() < PREVALENCE["cardiomegaly"]),
        pneumothorax=str(rng.choice(SIDES)) if rng.random() < PREVALENCE["pneumothorax"] else None,
        nodule=nodule,
        nodule_lobe=str(rng.choice(LOBES)),
        nodule_mm=int(rng.integers(8, 26)),
        devices=tuple(sorted(rng.choice(DEVICES, size=n_devices, replace=False).tolist())),
    )


def draw_chest(
    findings: ChestFindings, view: str = "PA", width: int = 256, height: int | None = None, seed: int = 0
) -> Image.Image:
    """One radiograph (8-bit grayscale) of `findings` in `view` ("PA", "AP" or "LATERAL").

    The anatomy (size, position, rib phase, texture, exposure) varies with `seed`, and with it
    alone: the same seed with other findings gives the same patient and noise, so two images
    differ exactly by their findings. AP views have the lower lung volumes and magnified heart
    of a supine portable film.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    rng = np.random.default_rng(seed)
    height = height or width
    # Large images are drawn at most MAX_DRAW_SIDE pixels and upsampled (only the grain is at
    # full resolution): five times faster at 2500 px, and the shapes have no finer detail.
    scale = min(1.0, MAX_DRAW_SIDE / max(width, height))
    w, h = round(width * scale), round(height * scale)
    draw = _lateral if view == "LATERAL" else _frontal
    density = draw(findings, w, h, rng, view == "AP")
    contrast, gamma = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    exposure = 0.02 * smooth_noise(rng, w, h, 3)
    density = np.clip(density * contrast + exposure + rng.uniform(-0.03, 0.03), 0, 1) ** gamma
    if (w, h) != (width, height):
        density = np.asarray(
            Image.fromarray(density.astype(np.float32)).resize((width, height), Image.BICUBIC)
        )
    return to_gray_image(density, rng, noise=0.012)


def _lobe_height(lobe: str, y_top: float, fraction: float) -> float:
    """The height of a nodule at `fraction` of its lobe's range (upper lobe: apex to hilum)."""
    low, high = (y_top + 0.1, 0.42) if lobe == "upper" else (0.5, 0.62)
    return low + (high - low) * fraction


def _image_sign(side: str) -> int:
    """+1 if the patient's `side` is on the image's right in a frontal view, else -1."""
    return 1 if side == "left" else -1


def _frontal(f: ChestFindings, width: int, height: int, rng: np.random.Generator, ap: bool) -> np.ndarray:
    x, y = grid(width, height)
    e = max(0.006, 1.5 / width)  # edge softness: physical, but never under ~1.5 pixels
    place = rng.uniform(size=3).tolist()  # where findings go: drawn even when absent (see draw_chest)
    xs = 0.5 + rng.uniform(-0.015, 0.015)  # the midline
    y_cp = 0.80 - (0.03 if ap else 0.0) + rng.uniform(-0.015, 0.015)  # costophrenic angles
    y_top = 0.12 + rng.uniform(-0.01, 0.01)
    body = soft(
        0.1 + 0.37 * np.clip((y + 0.02) / 0.16, 0, 1) ** 0.5 - np.abs(x - xs), 0.01
    )  # neck, shoulders
    density = 0.03 + body * (0.38 + 0.1 * soft(y - 0.76, 0.06))
    lungs = np.zeros_like(x * y)
    markings = 0.03 * smooth_noise(rng, width, height, 40) + 0.015 * smooth_noise(rng, width, height, 12)
    for side in SIDES:
        sign = _image_sign(side)
        cx, a = xs + sign * 0.21, 0.17 + rng.uniform(-0.01, 0.01)
        dx = np.abs(x - cx) - a * np.clip((y - y_top) / 0.45, 0, 1) ** 0.4  # widening from the apex
        cp = y_cp - (0.02 if side == "right" else 0.0)  # the liver lifts the right hemidiaphragm
        dome = cp - 0.1 * (1 - np.clip((x - cx) / a, -1, 1) ** 2)
        lung = soft(-dx, e) * soft(dome - y, e) * soft(y - y_top, e)
        hilum = np.exp(-((x - xs - sign * 0.1) ** 2 + (y - 0.42) ** 2) / 0.012)
        texture = markings + 0.1 * hilum
        if f.pneumothorax == side:
            depth = np.minimum(-dx, y - y_top)  # how far inside the lung, from the apex and the wall
            rim = 0.035 + 0.015 * place[0]
            apical = soft(y_top + 0.28 - y, 0.05)
            texture = texture * (1 - soft(rim - depth, e) * apical) - 0.06 * soft(rim - depth, e) * apical
            texture = texture + 0.12 * apical * np.exp(-(((depth - rim) / max(0.0025, 0.7 / width)) ** 2))
        if side in f.effusions:
            h = EFFUSION_HEIGHT[f.effusions[side]]
            lateral = np.clip(sign * (x - cx) / a, 0, 1)
            level = cp - h * (1 + lateral**2)
            fluid = soft(a - np.abs(x - cx), e) * soft(y - level, 0.02 + e)
            lung = lung * (1 - (0.55 if f.effusion_uncertain else 0.9) * fluid)
        density = density + lung * texture
        lungs = lungs + lung
    hx = xs + 0.035
    sides = (0.26, 0.15) if f.cardiomegaly else (0.17, 0.10)
    rx = np.where(x > hx, *np.float32(sides)) * (1.08 if ap else 1.0) * rng.uniform(0.96, 1.04)
    heart = soft((1 - np.sqrt(((x - hx) / rx) ** 2 + ((y - 0.6) / 0.13) ** 2)) * 0.1, e)
    mediastinum = np.maximum(soft(0.055 - np.abs(x - xs), e) * soft(y - 0.05, e), heart)
    mediastinum = np.maximum(mediastinum, disc(x, y, xs + 0.06, 0.3, 0.03, e))  # aortic knob
    density = density - 0.32 * lungs * (1 - 0.92 * mediastinum) + 0.06 * mediastinum
    density -= 0.1 * soft(0.014 - np.abs(x - xs), e) * soft(0.33 - y, 0.02)  # trachea
    density += 0.025 * soft(0.035 - np.abs(x - xs), e) * np.cos(np.pi * y / 0.045) ** 2  # vertebrae
    off = np.abs(x - xs)
    # Posterior ribs rise from the spine and curve down at the chest wall; anterior ribs, fainter,
    # slope down towards the middle.
    ribs = np.cos(np.pi * (y + 0.25 * off - 0.6 * off**2) / 0.075 + rng.uniform(0, np.pi)) ** 8
    ribs += 0.4 * np.cos(np.pi * (y + 0.3 * off) / 0.09 + rng.uniform(0, np.pi)) ** 8 * soft(off - 0.2, 0.1)
    density += 0.07 * ribs * soft(y - 0.1, 0.03) * soft(0.78 - y, 0.03) * soft(0.43 - off, 0.03)
    clavicle = np.exp(-(((y - 0.14 + 0.19 * (off - 0.05)) / 0.012) ** 2))
    density += 0.12 * clavicle * soft(off - 0.05, e) * soft(0.37 - off, e)
    if f.nodule:
        sign = _image_sign(f.nodule)
        ny = _lobe_height(f.nodule_lobe, y_top, place[1])
        nx = xs + sign * (0.21 + 0.09 * place[2])
        density += 0.22 * disc(x, y, nx, ny, f.nodule_mm / 2 / CHEST_WIDTH_MM, e)
    lines = [(_DEVICE_LINES[d], 0.006 if d == "endotracheal tube" else 0.004) for d in f.devices]
    pacer = [(xs + 0.2, 0.14, xs + 0.28, 0.19)] if "pacemaker" in f.devices else []
    return density + 0.35 * _line_mask(lines, pacer, xs - 0.5, width, height)


# Device paths on a frontal view (x relative to a midline at 0.5, y as in `grid`): an ETT ending
# above the carina, an enteric tube into the stomach under the left hemidiaphragm, a PICC from
# the right arm to the SVC, and pacemaker leads from a left pectoral generator to the heart.
_DEVICE_LINES = {
    "endotracheal tube": [(0.5, -0.2), (0.5, 0.27)],
    "enteric tube": [(0.49, -0.2), (0.49, 0.5), (0.55, 0.78), (0.64, 0.84)],
    "right PICC line": [(0.0, 0.33), (0.2, 0.23), (0.36, 0.21), (0.46, 0.27), (0.47, 0.36)],
    "pacemaker": [(0.74, 0.17), (0.56, 0.24), (0.47, 0.42), (0.52, 0.62)],
}


def _line_mask(lines, boxes, shift: float, width: int, height: int) -> np.ndarray:
    """A 0..1 mask of polylines [(points, thickness), ...] and filled boxes (x0, y0, x1, y1), all
    in grid units, drawn in pixels with Pillow and moved right by `shift` image widths."""
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)

    def px(u: float, v: float) -> tuple[float, float]:
        return ((u + shift) * width, v * width + (height - width) / 2)

    for points, thickness in lines:
        draw.line([px(*p) for p in points], fill=255, width=max(1, round(thickness * width)), joint="curve")
    for x0, y0, x1, y1 in boxes:
        draw.rounded_rectangle([px(x0, y0), px(x1, y1)], radius=0.01 * width, fill=255)
    return np.asarray(mask, dtype=np.float32) / 255


def _lateral(f: ChestFindings, width: int, height: int, rng: np.random.Generator, ap: bool) -> np.ndarray:
    """A lateral view: anterior to the image's left. Sides overlap here, so an effusion of
    either side shows as fluid in the posterior costophrenic sulcus (image bottom right)."""
    x, y = grid(width, height)
    e = max(0.006, 1.5 / width)
    place = rng.uniform(size=2).tolist()
    shift = rng.uniform(-0.02, 0.02)
    x = x - shift
    body = soft(x - 0.12 - 0.15 * np.clip(1 - y / 0.25, 0, 1) ** 2, e) * soft(0.9 - x, e)  # neck, chest wall
    density = 0.03 + body * (0.38 + 0.1 * soft(y - 0.74, 0.05))
    cx, a, y_top = 0.46, 0.28, 0.12
    dx = np.abs(x - cx) - a * np.sqrt(np.clip((y - y_top) / 0.25, 0, 1))
    floor = 0.66 + 0.16 * np.clip((x - 0.18) / 0.56, 0, 1) ** 2 - (0.03 if ap else 0.0)
    lung = soft(-dx, e) * soft(floor - y, e) * soft(y - y_top, e)
    if f.effusions:
        h = max(EFFUSION_HEIGHT[size] for size in f.effusions.values())
        level = 0.82 - h * (1 + 0.8 * np.clip((x - cx) / a, 0, 1) ** 2)
        lung = lung * (1 - (0.45 if f.effusion_uncertain else 0.9) * soft(y - level, 0.02 + e))
    hx = 0.4 if f.cardiomegaly else 0.36
    heart = disc(x, y, hx, 0.6, (0.21 if f.cardiomegaly else 0.15, 0.14), e)
    lung = lung * (1 - 0.85 * heart)
    texture = 0.03 * smooth_noise(rng, width, height, 40) - 0.3
    density = density + lung * texture + 0.05 * heart
    spine = soft(0.05 - np.abs(x - 0.76), e) * soft(y - 0.05, e)
    density += spine * (0.1 + 0.08 * soft(0.35 - np.abs((y / 0.055) % 1 - 0.5), 0.1))
    density += 0.1 * soft(0.015 - np.abs(x - 0.135), e) * soft(y - 0.15, e) * soft(0.6 - y, e)  # sternum
    density -= 0.1 * soft(0.012 - np.abs(x - 0.42 - 0.25 * y), e) * soft(0.34 - y, 0.02)  # trachea
    if f.nodule:
        ny = _lobe_height(f.nodule_lobe, y_top, place[0])
        density += 0.2 * disc(x, y, 0.45 + 0.2 * place[1], ny, f.nodule_mm / 2 / CHEST_WIDTH_MM, e)
    lines = {
        "endotracheal tube": ([(0.37, -0.2), (0.48, 0.27)], 0.006),
        "enteric tube": ([(0.44, -0.2), (0.56, 0.5), (0.4, 0.8)], 0.004),
        "pacemaker": ([(0.14, 0.2), (0.3, 0.35), (0.34, 0.62)], 0.004),
    }
    pacer = [(0.1, 0.17, 0.16, 0.22)] if "pacemaker" in f.devices else []
    return density + 0.35 * _line_mask(
        [lines[d] for d in f.devices if d in lines], pacer, shift, width, height
    )
