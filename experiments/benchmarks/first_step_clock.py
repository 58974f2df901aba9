"""The callback that stops `medsd fit` after its first training step, for benchmarks/startup.py.

Kept apart from startup.py because the `medsd fit` process imports it: this module may import
Lightning, the benchmark driver should not.
"""

from __future__ import annotations

import os
import time

import lightning as L

# The file the first step's finishing time (time.time()) is written to.
CLOCK_FILE = "MEDSD_FIRST_STEP_FILE"


class FirstStepClock(L.Callback):
    """Writes the time the first training batch (its optimizer step included) finished, then ends
    the process at once: nothing after it (checkpoints, export, metrics) is measured."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(os.environ[CLOCK_FILE], "w") as file:
            file.write(repr(time.time()))
        os._exit(0)  # not sys.exit: Lightning would catch it and run its teardown
