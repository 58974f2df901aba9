"""No file medsd reads can run code: every loader refuses a crafted pickle, and the file it would
create is never created; medsd's own checkpoints and the weight files it expects still load."""

import shutil
from pathlib import Path

import pytest
import torch
import torchxrayvision as xrv

from datamodules.safe_load import UnsafeFileError, check_state_dict, load_checkpoint
from evaluation.classifier import build_network
from evaluation.features import XRV_WEIGHTS, InceptionFeatures, XRVFeatures, xrv_densenet
from evaluation.fid_protocols import torchmetrics_inception
from experiments.cli import main as medsd
from experiments.export_checkpoint import export_checkpoint

pytestmark = pytest.mark.slow

TINY = Path("experiments/configs/tiny")


class Payload:
    """Unpickled, it creates the file `target`: what a crafted checkpoint could do instead."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """(a crafted torch file, the file that loading it with a full unpickler would create)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    return path, marker


def test_the_crafted_file_does_run_code_under_a_full_unpickler(crafted):
    """The fixture is a real threat: the check below would otherwise prove nothing."""
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


def loaders(path: Path, folder: Path):
    """Every loader of a torch file the user can point medsd at, called on `path`."""
    release = folder / "release"
    release.mkdir()
    shutil.copy(path, release / Path(xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]).name)
    return {
        "load_checkpoint": lambda: load_checkpoint(path),
        "check_state_dict": lambda: check_state_dict(path),
        "classifier densenet121 weights": lambda: build_network("densenet121", 2, str(path)),
        "classifier xrv weights": lambda: build_network("xrv-densenet121", 2, str(path)),
        "xrv features": lambda: XRVFeatures(weights_dir=str(release)),
        "inception features": lambda: InceptionFeatures(str(path)),
        "torchmetrics inception": lambda: torchmetrics_inception(weights=str(path)),
    }


def test_every_loader_refuses_a_crafted_pickle(crafted, tmp_path):
    path, marker = crafted
    for name, load in loaders(path, tmp_path).items():
        with pytest.raises(UnsafeFileError, match="could run code"):
            load()
        assert not marker.exists(), name


def test_medsd_export_refuses_a_crafted_checkpoint(crafted, tmp_path):
    path, marker = crafted
    run = tmp_path / "run"
    run.mkdir()
    for name in ("unet.yaml", "data.yaml", "trainer.yaml"):
        shutil.copy(TINY / name, run / ("config.yaml" if name == "unet.yaml" else name))
    with pytest.raises(UnsafeFileError):
        export_checkpoint(run, str(path))
    assert not marker.exists()


def test_medsd_checkpoints_load_safely(tmp_path):
    medsd(
        [
            "fit",
            "--config",
            str(TINY / "lora.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--cost.count_flops",
            "false",
        ]
    )
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]
    export = export_checkpoint(tmp_path, "last")
    assert (export / "medsd_export.json").is_file()


def test_a_pickled_torchxrayvision_model_is_read_with_its_release_settings(tmp_path):
    """torchxrayvision's releases are whole pickled DenseNets: read with only layer classes allowed,
    the weights and the labels, thresholds and resolution that `weights=` sets come back."""
    torch.manual_seed(0)
    saved = xrv.models.DenseNet(weights=None)
    path = tmp_path / "release.pt"
    torch.save(saved, path)
    network = xrv_densenet(path)
    for name, value in saved.state_dict().items():
        if name != "op_threshs":
            assert torch.equal(network.state_dict()[name], value), name
    info = xrv.models.model_urls[XRV_WEIGHTS]
    assert network.pathologies == info["labels"] and network.weights == XRV_WEIGHTS
    assert torch.equal(network.op_threshs, torch.tensor(info["op_threshs"]))
    assert not network.training


def test_a_state_dict_passes_the_check_and_a_pickled_model_does_not(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "state.pt")
    assert check_state_dict(tmp_path / "state.pt") == tmp_path / "state.pt"
    torch.save(xrv.models.DenseNet(weights=None), tmp_path / "model.pt")
    with pytest.raises(UnsafeFileError):
        check_state_dict(tmp_path / "model.pt")
