"""Graph passes of cpdfx: pure functions from torch.fx graphs to facts or graphs."""
from .attention import fold_attention
from .comb import Comb, Group, comb, kept_indices
from .eliminate import eliminate, propagate_shapes
from .mode import set_mode
from .ops import OPS, Op

__all__ = ["Comb", "Group", "OPS", "Op", "comb", "eliminate", "fold_attention", "kept_indices",
           "propagate_shapes", "set_mode"]
