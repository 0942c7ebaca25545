"""packvit-native: packed, padding-free vision encoders with varlen attention.

>>> import packvit_native as pv
>>> model = pv.from_pretrained("facebook/dinov3-vitl16-pretrain-lvd1689m")
>>> patches, grid_thw = pv.preprocess(["cat.jpg", "street.png"], model)  # mixed sizes, one packed tensor
>>> feats = model(patches, grid_thw)                                    # [total_patches, hidden]
"""

from .attention import available_backends, varlen_attention
from .config import EncoderConfig
from .encoder import EncoderOutput, PackedVisionEncoder
from .errors import CheckpointError
from .loading import from_pretrained
from .packing import Packing
from .patchify import patchify, unpatchify
from .preprocess import preprocess

__all__ = [
    "CheckpointError",
    "EncoderConfig",
    "EncoderOutput",
    "PackedVisionEncoder",
    "Packing",
    "available_backends",
    "from_pretrained",
    "patchify",
    "preprocess",
    "unpatchify",
    "varlen_attention",
]
__version__ = "0.1.0"
