"""dit_accel: step-aware sparse attention for diffusion-transformer pipelines.

handle = dit_accel.accelerate(pipe)            # the default preset
handle.stats(); handle.remove()
"""

from .api import AccelHandle, accelerate
from .config import DEFAULT_METHOD, METHODS, PRESETS, AccelConfig

__version__ = "0.1.0"

__all__ = ["AccelConfig", "AccelHandle", "DEFAULT_METHOD", "METHODS", "PRESETS", "accelerate", "__version__"]
