"""Trained weights in: a state dict from a file, or a transformers folder.

    load_weights(model, "model.pt")       # or .pth, .safetensors; strict
    save_weights(model, "teacher.pt")     # what load_weights reads back
    from_pretrained("my-vit/", task)      # a save_pretrained folder, local files only

A `.pt`/`.pth` file is read with `torch.load(weights_only=True)`: a state dict
(`torch.save(model.state_dict(), path)`), or a checkpoint dict holding one under
"state_dict", "model_state_dict" or "model" (as Lightning and most training
scripts save them); the "module." prefix DistributedDataParallel puts on every
key is dropped. A `.safetensors` file is read with the `safetensors` package.
Loading is strict, as the model's own `load_state_dict(strict=True)`: any key
missing or left over, or any shape that differs, is a `WeightsError` naming a
few of each, since a model that silently keeps part of its random weights is
the failure this module exists to prevent.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import zoo
from .files import atomic_path

SUFFIXES = (".pt", ".pth", ".safetensors")
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoint dicts keep the weights
DDP_PREFIX = "module."
SHOWN = 3  # keys named per kind of mismatch


class WeightsError(ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a .pt/.pth or .safetensors file, by name (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".pt2":
        raise WeightsError(f"{path} is a saved cpdfx model (.pt2), which carries its own weights: give it as "
                           f"the model, without --weights")
    if path.suffix not in SUFFIXES:
        raise WeightsError(f"{path}: give weights as a state dict in a .pt or .pth file "
                           f"(torch.save(model.state_dict(), path)) or a .safetensors file")
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return _strip_ddp(state)


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"cannot read {path} as a .safetensors file: {err}") from None


def _read_torch(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # weights_only refuses any object but tensors and containers
            raise WeightsError(f"{path} holds Python objects besides tensors (a whole model saved with "
                               f"torch.save(model)?): cpdfx reads weights only; save model.state_dict() "
                               f"instead") from None
        raise WeightsError(f"cannot read {path} as a torch file: it is damaged or of another kind") from None
    except (RuntimeError, EOFError, OSError) as err:  # not a torch file, or a truncated one
        raise WeightsError(f"cannot read {path} as a torch file: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = (f"a dict with the keys {', '.join(map(repr, list(obj)[:6]))}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise WeightsError(f"{path} holds {what}, not a state dict: save model.state_dict(), or a checkpoint "
                           f"dict holding it under {' or '.join(map(repr, CHECKPOINT_KEYS))}")
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_ddp(state: dict) -> dict:
    """A DistributedDataParallel module's keys without the "module." it adds to each."""
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path) -> nn.Module:
    """model with the weights of the file at path, loaded strictly (WeightsError
    naming the keys and shapes that do not fit); returns model."""
    state = read_state_dict(path)
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:
        raise WeightsError(f"the weights in {path} do not fit the model: {mismatch}. Build the model with "
                           f"the same architecture and arguments as the one that was trained")
    model.load_state_dict(state, strict=True)
    return model


def describe_mismatch(expected: dict, given: dict) -> str:
    """'' when given has the keys and shapes of expected; otherwise what differs,
    a few of each kind."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    return _describe(missing, unexpected, shapes)


def _describe(missing: list, unexpected: list, shapes: list = ()) -> str:
    parts = [f"{len(items)} {kind} ({'; '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''})"
             for kind, items in (("missing from the file", missing), ("not in the model", unexpected),
                                 ("of another shape", shapes)) if items]
    return ", ".join(parts)


def save_weights(model: nn.Module, path) -> Path:
    """model's state dict at path (written whole or not at all), for load_weights."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return Path(path)


def from_pretrained(folder, task: str = "classification") -> nn.Module:
    """The transformers model a `save_pretrained` folder holds (config.json and
    its weights), from local files only: built by AutoModelForImageClassification
    (AutoModelForSemanticSegmentation for segmentation), or, for a config those
    do not take, by the class its config's `architectures` names. Strict: a
    weight the folder lacks (which transformers would initialise at random) or
    one the model does not use is a WeightsError."""
    transformers = zoo._hf()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} is not a save_pretrained folder: it has no config.json (cpdfx loads "
                           f"transformers models from local folders only, and never downloads)")
    auto = (transformers.AutoModelForImageClassification if task == "classification"
            else transformers.AutoModelForSemanticSegmentation)
    log = transformers.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # its load report and bars: a mismatch is our error, below
    log.disable_progress_bar()
    options = dict(local_files_only=True, output_loading_info=True,
                   ignore_mismatched_sizes=True)  # reported in info, and refused below with the shapes
    try:
        try:
            model, info = auto.from_pretrained(folder, **options)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            model, info = _by_architecture(transformers, folder, task).from_pretrained(folder, **options)
    except WeightsError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"cannot load the transformers model in {folder}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    shapes = [f"{k} {tuple(saved)} in the file, {tuple(built)} in the model"
              for k, saved, built in sorted(info["mismatched_keys"])]
    if missing or unexpected or shapes:
        raise WeightsError(f"the weights in {folder} do not fit the {type(model).__name__} its config.json "
                           f"describes: {_describe(missing, unexpected, shapes)}. "
                           f"Save the whole trained model (its head too) with save_pretrained, beside the "
                           f"config it was trained with")
    return model.eval()


def _by_architecture(transformers, folder: Path, task: str):
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = [n for n in (config.architectures or []) if hasattr(transformers, n)]
    if not names:
        raise WeightsError(f"{folder}: transformers has no {task} model for a {type(config).__name__}, and "
                           f"its config.json names no model class (architectures) to build instead")
    return getattr(transformers, names[0])
