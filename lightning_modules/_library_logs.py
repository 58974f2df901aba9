"""Log levels and warnings of libraries that speak before medsd can configure anything.

peft and diffusers import bitsandbytes (the 8-bit optimiser) when it is installed, and its CPU
backend then warns that an optional 4-bit kernel could not be downloaded: medsd uses no 4-bit
kernel, so only bitsandbytes' errors are shown.

Lightning warns about every module in eval mode when training starts. medsd's frozen parts are
in eval mode by design (lightning_modules/modes.py), and DiffusionModule.on_train_start logs how
many modules train and how many are frozen instead.

Lightning warns when a fit starts in a checkpoint folder that is not empty: medsd refuses that
unless the fit resumes (lightning_modules/run_checkpoints.py), where the files are expected.
"""

import logging
import warnings

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
