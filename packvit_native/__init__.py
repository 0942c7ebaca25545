"""packvit-native: packed, padding-free vision encoders with varlen attention.

>>> import packvit_native as pv
>>> model = pv.from_pretrained("facebook/dinov3-vitl16-pretrain-lvd1689m")
>>> patches, grid_thw = model.patchify([img0, img1])        # mixed sizes, one packed tensor
>>> feats = model(patches, grid_thw)                          # [total_patches, hidden]
"""

from .attention import available_backends, varlen_attention
from .config import EncoderConfig
from .encoder import EncoderOutput, PackedVisionEncoder
from .loading import from_pretrained
from .packing import Packing
from .patchify import patchify, unpatchify

__all__ = [
    "EncoderConfig",
    "EncoderOutput",
    "PackedVisionEncoder",
    "Packing",
    "available_backends",
    "from_pretrained",
    "patchify",
    "unpatchify",
    "varlen_attention",
]
__version__ = "0.1.0"
