"""The plain-PyTorch baseline of experiments/benchmarks/startup.py trains on what medsd trains on."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules import MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from lightning_modules.backbones import DEMO_BASE_DIR

pytestmark = pytest.mark.slow

PLAIN = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "plain_first_step.py"


def test_the_plain_script_reads_the_datamodules_records_and_clocks_one_step(tmp_path):
    root = write_phantoms("mimic-cxr", 24, tmp_path / "data", seed=3, image_size=64)

    # A script, not a package module: loaded from its file.
    spec = importlib.util.spec_from_file_location("plain_first_step", PLAIN)
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    records = MIMICCXRDataModule(str(root), prompt_source="labels").records("train")
    assert records
    assert sorted(plain.training_examples(str(root))) == sorted((r.image, r.prompt) for r in records)

    clock = tmp_path / "first_step"
    start = time.time()
    env = {**os.environ, "MEDSD_FIRST_STEP_FILE": str(clock), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(PLAIN), str(root), str(DEMO_BASE_DIR), "--logs", str(tmp_path / "logs")]
    subprocess.run(command, env=env, check=True)
    assert start < float(clock.read_text()) < time.time()
