"""cpdfx: a compile-time slimmer for PyTorch vision models.

capture -> comb -> importance -> budget -> eliminate, on torch.fx graphs from torch.export.
"""
from passes import comb, eliminate, set_mode

from .capture import CaptureError, capture
from .cost import Cost, cost
from .importance import CRITERIA, Criterion
from .prune import BudgetError, Constraints, prune
from .pruner import Pruner, slice_optimizer
from .report import format_report

__version__ = "0.1.0"

__all__ = ["BudgetError", "CRITERIA", "CaptureError", "Constraints", "Cost", "Criterion", "Pruner",
           "capture", "comb", "cost", "eliminate", "format_report", "prune", "set_mode",
           "slice_optimizer"]
