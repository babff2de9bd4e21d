"""glofnd: GloFND, global false-negative discovery for contrastive learning.

``implementation`` is ``"c"`` when the C extension is loaded, ``"reference"`` otherwise (the
pure-torch path, with the same semantics).
"""
from ._ops import implementation, use_backend
from .state import GloFND
from .losses import GloFNDClipLoss, GloFNDLoss
from . import functional
from .numpy_api import threshold_step

__all__ = ["GloFND", "GloFNDClipLoss", "GloFNDLoss", "functional", "implementation",
           "threshold_step", "use_backend"]
__version__ = "0.1.0"
