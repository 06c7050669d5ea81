"""dit_accel: step-aware sparse attention for diffusion-transformer pipelines.

handle = dit_accel.accelerate(pipe)            # the default preset
handle.stats(); handle.remove()
"""

from typing import Any

from .config import DEFAULT_METHOD, METHODS, PRESETS, AccelConfig

__version__ = "0.1.0"

__all__ = ["AccelConfig", "AccelHandle", "DEFAULT_METHOD", "METHODS", "PRESETS", "accelerate", "__version__"]

# ``accelerate`` and ``AccelHandle`` live in .api, which imports diffusers' hooks (and with them torch._dynamo):
# seconds of imports that ``import dit_accel`` for the config, or ``dit-accel info``, does not need.
_LAZY = ("AccelHandle", "accelerate")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
