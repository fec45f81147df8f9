"""unisd-fast: fused, exact UniSD self-distillation losses for LLMs."""

from .config import PRESETS, UniSDConfig
from .linear import UniSDLinearLoss, unisd_linear_loss
from .losses import UniSDLoss, UniSDOutput, unisd_loss

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "UniSDConfig", "UniSDLinearLoss", "UniSDLoss", "UniSDOutput", "unisd_linear_loss",
    "unisd_loss", "__version__",
]
