"""Durable state on disk: tensors in safetensors, the rest in JSON, written atomically.

Checkpoints of the coordinator and the saved state of a site are both "a nested structure of
tensors and plain values" (an optimizer's ``state_dict`` is one). :func:`save_state` splits
such a structure into a safetensors file and a JSON file inside a directory that appears
under its final name only once complete; :func:`load_state` puts it back together exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atoll.util.atomic import replace_directory

TENSOR_KEY = "__tensor__"


class StateError(ValueError):
    """Saved state that is missing, incomplete or corrupt: names the path and the problem."""


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in ``obj`` by a ``{"__tensor__": key}`` marker, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "value"
        tensors[key] = obj.detach().contiguous().cpu()
        return {TENSOR_KEY: key}
    if isinstance(obj, dict):
        # JSON keys are strings: remember int keys (optimizer state is keyed by param index)
        return {
            "__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))]
                         for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{prefix}.{i}" if prefix else str(i))
                 for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Put back what :func:`flatten` took apart: markers by their tensors, dicts and tuples
    as they were."""
    if isinstance(obj, dict):
        if TENSOR_KEY in obj:
            return tensors[obj[TENSOR_KEY]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` to ``directory`` (``tensors.safetensors`` + ``state.json``), atomically."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(tensors, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(skeleton))
    replace_directory(tmp, directory)


def load_state(directory: Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; raises :class:`StateError` if it is not whole."""
    directory = Path(directory)
    try:
        skeleton = json.loads((directory / "state.json").read_text())
        tensors = load_file(directory / "tensors.safetensors")
    except FileNotFoundError as e:
        raise StateError(f"{directory}: incomplete saved state ({Path(e.filename).name} missing)"
                         ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{directory / 'state.json'}: corrupt ({e})") from None
    except (SafetensorError, OSError) as e:
        raise StateError(f"{directory / 'tensors.safetensors'}: corrupt ({e})") from None
    try:
        return unflatten(skeleton, tensors)
    except KeyError as e:
        raise StateError(f"{directory}: tensor {e} named in state.json is missing") from None
