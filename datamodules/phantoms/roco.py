"""Radiology phantoms of several modalities in the ROCOv2 layout (ImageCLEFmedical Caption).

ROCOv2 pairs figures from open-access articles with their captions and UMLS concepts; here
five kinds of scan (chest X-ray, head CT, abdominal CT, brain MRI, liver ultrasound), each with
or without one finding, are captioned and coded from what was drawn. Sides are the patient's,
displayed in the radiological convention: the patient's left on the image's right.

Layout written: `{train,valid,test}/ROCOv2_2023_{split}_NNNNNN.jpg`, `{split}_captions.csv`
(ID,Caption), `{split}_concepts.csv` and `{split}_concepts_manual.csv` (ID,CUIs, ';'-separated;
the manual ones are modality first, then anatomy), `cui_mapping.csv`, `license_information.csv`
(whose PMCIDs are random placeholders: no article is behind a phantom) and `phantom_truth.csv`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._common import disc, grid, save_jpeg, smooth_noise, soft, split_counts, to_gray_image, write_csv
from .chest import ChestFindings, draw_chest

CUI_NAMES = {
    "C0040405": "X-Ray Computed Tomography",
    "C1306645": "Plain x-ray",
    "C0024485": "Magnetic Resonance Imaging",
    "C0041618": "Ultrasonography",
    "C0817096": "Chest",
    "C0018670": "Head",
    "C0000726": "Abdomen",
    "C0006104": "Brain",
    "C0023884": "Liver",
    "C0221198": "Lesion",
    "C0032227": "Pleural effusion",
    "C0010709": "Cyst",
}
# scan -> manual concepts (modality, anatomy), extra caption concepts, the finding's CUI, height/width
SCANS = {
    "chest x-ray": (("C1306645", "C0817096"), (), "C0032227", 1.2),
    "head ct": (("C0040405", "C0018670"), ("C0006104",), "C0221198", 1.0),
    "abdomen ct": (("C0040405", "C0000726"), ("C0023884",), "C0221198", 1.0),
    "brain mri": (("C0024485", "C0006104"), (), "C0221198", 1.0),
    "liver ultrasound": (("C0041618", "C0000726"), ("C0023884",), "C0010709", 0.75),
}
LATERALIZED = ("chest x-ray", "head ct", "brain mri")  # scans whose finding has a side
SPLITS = ("train", "valid", "test")
CAPTIONS = {  # scan -> (captions with the finding, captions without); {side} is the patient's
    "chest x-ray": (
        [
            "Chest X-ray showing a moderate {side} pleural effusion.",
            "Frontal chest radiograph demonstrating a {side} pleural effusion.",
        ],
        ["Frontal chest X-ray with clear lungs.", "Chest radiograph without acute abnormality."],
    ),
    "head ct": (
        [
            "Head CT demonstrating a {side} hypodense lesion.",
            "Axial non-contrast CT of the head showing a hypodense lesion in the {side} hemisphere.",
        ],
        [
            "Axial non-contrast head CT with no acute intracranial abnormality.",
            "Head CT showing normal brain parenchyma and ventricles.",
        ],
    ),
    "abdomen ct": (
        [
            "Axial CT of the abdomen showing a hypodense lesion in the liver.",
            "Abdominal CT demonstrating a focal hypodense liver lesion.",
        ],
        [
            "Axial CT of the abdomen at the level of the liver and spleen.",
            "Abdominal CT with a normal-appearing liver.",
        ],
    ),
    "brain mri": (
        [
            "Axial T2-weighted MRI of the brain showing a hyperintense lesion in the {side} hemisphere.",
            "Brain MRI demonstrating a {side} hyperintense lesion on T2-weighted imaging.",
        ],
        [
            "Axial T2-weighted MRI of the brain with normal appearance.",
            "Brain MRI without focal abnormality.",
        ],
    ),
    "liver ultrasound": (
        [
            "Ultrasound of the liver showing an anechoic cyst with posterior acoustic enhancement.",
            "Abdominal ultrasound demonstrating a simple hepatic cyst.",
        ],
        [
            "Ultrasound of the liver with homogeneous echotexture.",
            "Abdominal ultrasound image of a normal liver.",
        ],
    ),
}


def draw_scan(scan: str, finding: bool, side: str, width: int, seed: int) -> Image.Image:
    """A grayscale image of `scan` (a key of SCANS), with its finding on the patient's `side`
    (where a side applies: effusion, brain lesions) if `finding`."""
    rng = np.random.default_rng(seed)
    height = round(width * SCANS[scan][3])
    if scan == "chest x-ray":
        findings = ChestFindings(**{f"effusion_{side}": "moderate"}) if finding else ChestFindings()
        return draw_chest(findings, "PA", width, height, seed=int(rng.integers(2**63)))
    x, y = grid(width, height)
    e = max(0.004, 1.5 / width)
    image_x = 0.5 + (0.17 if side == "left" else -0.17)  # radiological convention
    lesion = disc(x, y, image_x, rng.uniform(0.38, 0.58), rng.uniform(0.05, 0.08), e) * finding
    texture = smooth_noise(rng, width, height, 24)
    if scan in ("head ct", "brain mri"):
        skull = disc(x, y, 0.5, 0.5, (0.36, 0.44), e)
        brain = disc(x, y, 0.5, 0.5, (0.33, 0.41), e)
        ventricles = disc(x, y, 0.46, 0.47, (0.03, 0.09), e) + disc(x, y, 0.54, 0.47, (0.03, 0.09), e)
        if scan == "head ct":  # bone white, brain grey, fluid and the lesion darker
            density = 0.3 * disc(x, y, 0.5, 0.5, (0.38, 0.46), e) + 0.65 * skull - 0.95 * brain
            density += brain * (0.45 + 0.02 * texture - 0.25 * ventricles - 0.15 * lesion)
        else:  # T2: scalp fat and fluid bright, cortical bone dark, the lesion bright
            density = 0.75 * disc(x, y, 0.5, 0.5, (0.38, 0.46), e) - 0.68 * skull + 0.85 * brain
            cortex = brain - disc(x, y, 0.5, 0.5, (0.3, 0.38), e)
            density += brain * (-0.45 + 0.03 * texture + 0.12 * cortex + 0.4 * ventricles + 0.35 * lesion)
    elif scan == "abdomen ct":
        body = disc(x, y, 0.5, 0.5, (0.45, 0.33), e)
        density = 0.3 * body + 0.15 * disc(x, y, 0.5, 0.5, (0.41, 0.29), e) + 0.03 * texture * body
        liver = disc(x, y, 0.34, 0.45, (0.15, 0.13), e)  # patient's right: image left
        density += 0.1 * liver + 0.1 * disc(x, y, 0.69, 0.42, (0.06, 0.08), e)  # liver, spleen
        density += 0.45 * disc(x, y, 0.5, 0.68, 0.05, e) + 0.3 * disc(
            x, y, 0.53, 0.57, 0.022, e
        )  # spine, aorta
        density += 0.15 * (disc(x, y, 0.37, 0.63, (0.04, 0.06), e) + disc(x, y, 0.64, 0.63, (0.04, 0.06), e))
        density -= 0.4 * disc(x, y, 0.55, 0.4, (0.05, 0.03), e)  # gas in the bowel
        density -= (
            0.22 * finding * liver * disc(x, y, 0.3, rng.uniform(0.4, 0.48), rng.uniform(0.03, 0.05), e)
        )
    else:  # a sector scan from a probe at the top: speckle, attenuation with depth, a cyst
        top = 0.5 - height / width / 2  # the probe, at the top edge
        r, angle = np.hypot(x - 0.5, y - top), np.arctan2(x - 0.5, y - top)
        sector = soft(0.62 - np.abs(angle), 0.01) * soft(r - 0.05, e) * soft(0.72 - r, e)
        cx, cy, radius = 0.5 + rng.uniform(-0.1, 0.1), top + rng.uniform(0.3, 0.4), rng.uniform(0.05, 0.08)
        cyst = disc(x, y, cx, cy, radius, e) * finding
        # Sound passes a cyst unattenuated: the tissue behind it is brighter.
        c_r, c_angle = np.hypot(cx - 0.5, cy - top), np.arctan2(cx - 0.5, cy - top)
        behind = soft(radius / c_r - np.abs(angle - c_angle), 0.03) * soft(r - c_r, 0.03) * finding
        echo = (0.55 + 0.05 * texture) * np.exp(-1.5 * r) * (1 + 0.6 * behind) * (1 - 0.95 * cyst)
        density = sector * echo * rng.rayleigh(0.8, size=echo.shape).astype(np.float32)
    return to_gray_image(np.clip(density, 0, 1), rng, noise=0.01)


def write_rocov2(out: Path, n: int, seed: int, image_size: int) -> None:
    """`n` scans `image_size` wide, split 80/10/10 into train/valid/test, into `out`."""
    rng = np.random.default_rng(seed)
    counts = dict(zip(SPLITS, split_counts(n), strict=True))
    license_rows, truth = [], []
    for split in SPLITS:
        (out / split).mkdir()
        captions, concepts, manual = [], [], []
        for i in range(1, counts[split] + 1):
            image_id = f"ROCOv2_2023_{split}_{i:06d}"
            scan = str(rng.choice(list(SCANS)))
            finding, side = bool(rng.random() < 0.5), str(rng.choice(["left", "right"]))
            save_jpeg(
                draw_scan(scan, finding, side, image_size, seed=int(rng.integers(2**63))),
                out / split / f"{image_id}.jpg",
            )
            manual_cuis, extra_cuis, finding_cui, _ = SCANS[scan]
            captions.append(
                (image_id, str(rng.choice(CAPTIONS[scan][0 if finding else 1])).format(side=side))
            )
            found = (*manual_cuis, *extra_cuis, *([finding_cui] if finding else []))
            concepts.append((image_id, ";".join(found)))
            manual.append((image_id, ";".join(manual_cuis)))
            pmcid = f"PMC{rng.integers(1_000_000, 10_000_000)}"
            license_rows.append(
                (
                    image_id,
                    pmcid,
                    "Synthetic medsd phantom; the PMCID is a placeholder",
                    f"https://www.ncbi.nlm.nih.gov/pmc/articles/{pmcid}/",
                )
            )
            truth.append(
                {
                    "path": f"{split}/{image_id}.jpg",
                    "ID": image_id,
                    "split": split,
                    "scan": scan,
                    "finding": finding,
                    "side": side if finding and scan in LATERALIZED else "",
                }
            )
        write_csv(pd.DataFrame(captions, columns=["ID", "Caption"]), out / f"{split}_captions.csv")
        write_csv(pd.DataFrame(concepts, columns=["ID", "CUIs"]), out / f"{split}_concepts.csv")
        write_csv(pd.DataFrame(manual, columns=["ID", "CUIs"]), out / f"{split}_concepts_manual.csv")
    write_csv(
        pd.DataFrame(list(CUI_NAMES.items()), columns=["CUI", "Canonical name"]), out / "cui_mapping.csv"
    )
    columns = ["ID", "PMCID", "Attribution", "Link"]
    write_csv(pd.DataFrame(license_rows, columns=columns), out / "license_information.csv")
    write_csv(pd.DataFrame(truth), out / "phantom_truth.csv")
