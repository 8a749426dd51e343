"""resa_tl: Rectified Sparse Attention (Sun et al. 2025) with TileLang kernels."""
from .config import ReSAConfig
from . import ops
from .cache import ReSACache
from . import reference_cycle
from .integration import attach, detach

__version__ = "0.1.0"
__all__ = ["ReSAConfig", "ReSACache", "ops", "reference_cycle", "attach", "detach",
           "__version__"]
