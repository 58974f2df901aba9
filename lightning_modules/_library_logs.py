"""Log levels for libraries that speak before medsd can configure anything.

peft and diffusers import bitsandbytes (the 8-bit optimiser) when it is installed, and its CPU
backend then warns that an optional 4-bit kernel could not be downloaded: medsd uses no 4-bit
kernel, so only bitsandbytes' errors are shown.
"""

import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
