"""SPACE-CLIP as a library: frozen encoder wrapper, dual-pathway decoder, losses, metrics.

Pure torch/numpy: no file I/O beyond `from_pretrained`/`save_pretrained`, no Prefect, no Zarr.
"""

__version__ = "0.1.0"

from spaceclip.encoder import FrozenEncoder, features_from_hidden_states, preprocess  # noqa: E402
from spaceclip.decoder import VARIANTS, SpaceClipDecoder  # noqa: E402
from spaceclip.losses import depth_loss, silog_loss, ssim_loss  # noqa: E402
from spaceclip.metrics import METRIC_KEYS, compute_metrics, crop_mask, mean_metrics  # noqa: E402
from spaceclip.model import EncoderMismatchError, SpaceClip  # noqa: E402

__all__ = [
    "FrozenEncoder", "features_from_hidden_states", "preprocess", "__version__",
    "SpaceClipDecoder", "VARIANTS",
    "depth_loss", "silog_loss", "ssim_loss",
    "METRIC_KEYS", "compute_metrics", "crop_mask", "mean_metrics",
    "SpaceClip", "EncoderMismatchError",
]
