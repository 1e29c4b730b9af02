"""Few-shot robust fine-tuning of CLIP on WILDS, driven by DVC and tracked in MLflow."""

from pipeline.core import env as _env

_env.setup_offline()

__version__ = "0.1.0"
