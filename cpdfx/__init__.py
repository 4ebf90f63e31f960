"""cpdfx: a compile-time slimmer for PyTorch vision models.

capture -> comb -> importance -> budget -> eliminate, on torch.fx graphs from torch.export.
"""
from .passes import comb, eliminate, set_mode

from .batchnorm import reestimate_batch_norm
from .bench import BenchResult, bench
from .capture import CaptureError, capture
from .compress import CompressResult, compress
from .cost import Cost, cost
from .data import DataError, resolve_data, split_off
from .distill import DistillResult, distill, evaluate
from .export import ExportError, LoadError, export_onnx, load, save
from .importance import CRITERIA, Criterion
from .losses import DistillLoss
from .budget import BudgetError, Constraints, Target
from .prune import prune
from .qat import distill_int8
from .quantize import QuantizeError, QuantizeResult, choose_method, quantize
from .pruner import Pruner, slice_optimizer
from .report import format_report
from .version import __version__

__all__ = ["__version__", "BenchResult", "BudgetError", "CRITERIA", "CaptureError", "CompressResult", "Constraints", "Cost", "Target",
           "Criterion", "DataError", "DistillLoss", "DistillResult", "ExportError", "LoadError", "Pruner",
           "QuantizeError", "QuantizeResult", "bench", "choose_method",
           "capture", "comb", "compress", "cost", "distill", "distill_int8", "eliminate", "evaluate", "export_onnx", "format_report",
           "load", "prune", "quantize", "reestimate_batch_norm", "resolve_data", "save", "set_mode", "slice_optimizer",
           "split_off"]
