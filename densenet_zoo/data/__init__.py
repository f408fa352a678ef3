"""Image input shared by training and inference: reading image files (``images``), finding a dataset's samples
(``splits``), preprocessing (``transforms``), the torch dataset (``dataset``) and sample data (``sample_data``).

It depends on nothing of ours but ``_utils``; the weights registry builds its entries' transforms from it.
"""

from .images import UnreadableImageError, open_image
from .splits import Splits, load_splits
from .transforms import eval_pipeline, resolve_preprocessing

__all__ = ["Splits", "UnreadableImageError", "eval_pipeline", "load_splits", "open_image", "resolve_preprocessing"]
