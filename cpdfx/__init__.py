"""cpdfx: a compile-time slimmer for PyTorch vision models.

capture -> comb -> importance -> budget -> eliminate, on torch.fx graphs from torch.export.
"""
from passes import comb, eliminate, set_mode

from .capture import CaptureError, capture
from .cost import Cost, cost
from .prune import BudgetError, prune

__version__ = "0.1.0"

__all__ = ["BudgetError", "CaptureError", "Cost", "capture", "comb", "cost", "eliminate", "prune",
           "set_mode"]
