"""cpdfx: a compile-time slimmer for PyTorch vision models.

capture -> comb -> importance -> budget -> eliminate, on torch.fx graphs from torch.export.
"""
import importlib

from .version import __version__

# The public API by the module that defines it, imported on first use (PEP 562): `import
# cpdfx` stays light, so that the command line answers Ctrl-C with exit 130 while torch loads.
_EXPORTS = {
    "passes": ("comb", "eliminate", "set_mode"),
    "batchnorm": ("reestimate_batch_norm",),
    "bench": ("BenchResult", "bench"),
    "capture": ("CaptureError", "capture"),
    "compress": ("CompressResult", "compress"),
    "cost": ("Cost", "cost"),
    "data": ("DataError", "resolve_data"),
    "distill": ("DistillResult", "distill", "evaluate"),
    "export": ("ExportError", "LoadError", "export_onnx", "load", "save"),
    "importance": ("CRITERIA", "Criterion"),
    "losses": ("DistillLoss",),
    "budget": ("BudgetError", "Constraints", "Target"),
    "prune": ("prune",),
    "pruner": ("Pruner", "slice_optimizer"),
    "report": ("format_report",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["__version__", *sorted(_HOME)]


def __getattr__(name: str):
    """A name of the API from its module, or a submodule (cpdfx.latency), once asked for."""
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
