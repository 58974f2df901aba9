"""Which checkpoints a run keeps, and which one a resume starts from, whatever killed the run.

`RunCheckpoint` is the ModelCheckpoint every `medsd fit` gets (`--checkpoint.*`). Next to
AtomicCheckpointIO (each file is written whole), it makes a run folder's state unambiguous:
- one best checkpoint by construction: it has a fixed name (`best.ckpt`), so a new best replaces
  the old one in a single rename, where a name per step left two files after a kill between
  writing the new one and removing the old;
- `last.ckpt` is written at every validation, not only when the best improved (Lightning's own
  rule), so a resume loses at most one validation interval;
- `--ckpt_path last` resumes from the complete checkpoint with the highest step, `last.ckpt` or
  `best.ckpt`: a kill at the first save, after the best and before the last, resumes from it
  instead of from scratch;
- a fresh fit (no `--ckpt_path`) into a folder that holds an earlier run's checkpoints is refused,
  so an earlier good best checkpoint is never silently replaced by a new run's first one;
- what a kill left behind is cleaned when the next fit starts: temporary checkpoint files, and
  an export replacement cut between its renames (`export.recover_interrupted`);
- a run folder copied or moved elsewhere keeps its best score when resumed there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.atomic import TEMPORARY_GLOB, recover_interrupted

log = logging.getLogger(__name__)

BEST = "best"


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint file was saved at, or None if it cannot be read (truncated,
    not a checkpoint). Memory-mapped: only the small pickled structure is read, not the tensors."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception as error:  # noqa: BLE001 - any unreadable file is "not a resume point"
        log.warning("%s cannot be read as a checkpoint and is not resumed from: %s", path, error)
        return None


def latest_checkpoint(folder: Path) -> Path | None:
    """The readable checkpoint of `folder` with the highest step (on a tie, `last.ckpt`)."""
    steps = {}
    for name in (f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt", f"{BEST}.ckpt"):
        path = folder / name
        if path.is_file() and (step := checkpoint_step(path)) is not None:
            steps[path] = step
    return max(steps, key=steps.get) if steps else None


class RunCheckpoint(ModelCheckpoint):
    def folder(self, trainer) -> Path:
        """Where this callback writes: its dirpath, else the one Lightning derives from the logger
        and the run folder (Lightning keeps that rule private; it is what `setup` uses too)."""
        return Path(self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer))

    def refuse_fresh_start_over_checkpoints(self, trainer, ckpt_path) -> None:
        """Called before `fit` with its `ckpt_path`: a run that does not resume may not write over
        an earlier run's checkpoints."""
        folder = self.folder(trainer)
        if ckpt_path is None and any(folder.glob("*.ckpt")):
            names = ", ".join(sorted(p.name for p in folder.glob("*.ckpt")))
            raise RuntimeError(
                f"{folder} holds the checkpoints of an earlier run ({names}): resume it with "
                "`--ckpt_path last`, or move them away or choose another --trainer.default_root_dir "
                "to start afresh"
            )

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit":
            for stale in Path(self.dirpath).glob(TEMPORARY_GLOB):
                log.warning("removing %s, left by a checkpoint write that was interrupted", stale)
                stale.unlink(missing_ok=True)
            recover_interrupted(Path(trainer.default_root_dir) / "export")

    # Lightning saves at the end of a training epoch when validation runs there, else at the end
    # of validation; last.ckpt follows whichever of the two saved.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer) -> None:
        # Lightning writes last.ckpt only at a step where it also wrote a best one.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # What Lightning resolves `ckpt_path="last"` to.
        latest = latest_checkpoint(self.folder(trainer))
        return {str(latest)} if latest else set()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the best score also when the run folder moved: the paths saved in the
        checkpoint are those of the old folder, and Lightning would otherwise forget the best
        score, so the first validation of the resumed run would replace a better best.ckpt."""
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:
            log.info("the run's checkpoints moved from %s to %s: their records follow", old, new)
            state_dict = {key: moved(value, old, new) for key, value in state_dict.items()}
            state_dict["dirpath"] = new
        super().load_state_dict(state_dict)


def moved(value, old: str, new: str):
    """`value` (a path, a {path: score} dict or anything else) with paths under `old` under `new`."""
    if isinstance(value, str) and Path(value).parent == Path(old):
        return str(Path(new) / Path(value).name)
    if isinstance(value, dict):
        return {moved(key, old, new): score for key, score in value.items()}
    return value
