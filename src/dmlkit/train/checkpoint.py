"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python containers/scalars: model weights, optimizer,
scheduler, grad-scaler and objective (loss parameters, memory bank) states, the sampler position, RNG
states, the resolved config and the model's rebuild recipe. Writing goes to a temporary file in the
same folder followed by ``os.replace`` so a crash never leaves a truncated file behind.

Reading (:func:`load`, and :func:`load_weights_only` for any torch file, e.g. pretrained weights) never
executes code from the file: a file holding other Python objects is refused with a message naming the
object, instead of torch's advice to retry with ``weights_only=False``, which would run it. Every failure
is one line naming the file. A run folder stands for its ``best.pt`` (:func:`checkpoint_file`).
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit.errors import DataError
from dmlkit.files import write_atomic

FORMAT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`dmlkit.files.write_atomic`: a temporary sibling, fsync, rename; the
    file readable as any other (not ``mkstemp``'s ``0600``)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


#: A run folder's checkpoints (``RunDirectory.BEST`` / ``RunDirectory.LAST``, which import this module).
BEST, LAST = "best.pt", "last.pt"
#: The object torch's weights-only unpickler refused, in each of its messages (``Unsupported global: GLOBAL
#: argparse.Namespace``, ``unsupported GLOBAL os.makedirs whose module os is blocked``, ``but got <cls>``).
_REFUSED_OBJECT = re.compile(
    r"(?:unsupported (?:global: )?GLOBAL|unrecognized function|add_safe_globals`,? but got) <?([^\s>]+)",
    re.IGNORECASE,
)
#: The C++ source location torch puts before some messages (``[enforce fail at inline_container.cc:180] .``).
_SOURCE_LOCATION = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint ``path`` names: a file as it is, a run folder's ``best.pt`` (the model selected on
    validation, as ``results.json`` reports it). A missing file, a run folder without ``best.pt`` (saying
    whether ``last.pt`` is there) or a folder without checkpoints raise ``DataError`` naming the path."""
    path = Path(path)
    if path.is_dir():
        if (path / BEST).is_file():
            return path / BEST
        if (path / LAST).is_file():
            raise DataError(
                f"run folder {path} has no {BEST} (its {LAST} is there: pass --checkpoint {path / LAST} "
                "to use the weights of the last epoch)"
            )
        raise DataError(f"{path} is a folder without a checkpoint (no {BEST} or {LAST})")
    if not path.exists():
        raise DataError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise DataError(f"checkpoint {path} is not a file")
    return path


def load_weights_only(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, never code.

    Raises ``DataError`` on one line naming ``what`` (``"checkpoint"``, ``"pretrained weights"``) and the
    file: empty, truncated or corrupted, not a PyTorch file, or holding other Python objects (naming the
    first one torch refused; such a file is not loaded, whatever it claims to be).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{what} {path} is an empty file")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of a plain pickle before refusing it: the error says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_OBJECT.search(str(exc))
        if refused is None:
            raise DataError(f"{what} {path} is not a PyTorch file (unreadable pickle data)") from exc
        raise DataError(
            f"{what} {path} holds objects other than tensors and plain values ({refused.group(1)}); dmlkit "
            "will not load it: unpickling such objects can execute code from the file"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:
        raise DataError(
            f"{what} {path} is truncated or corrupted (not a complete PyTorch zip archive: "
            f"{_first_sentence(str(exc))})"
        ) from exc
    except Exception as exc:  # torch's legacy reader fails with any error on other files (KeyError, EOFError)
        raise DataError(f"{what} {path} is not a PyTorch file ({type(exc).__name__})") from exc


def _first_sentence(text: str) -> str:
    """The first sentence of torch's message, without its C++ source location."""
    first_line = (text.strip().splitlines() or [""])[0]
    return _SOURCE_LOCATION.sub("", first_line).split(". ")[0].rstrip(".")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dmlkit checkpoint safely (:func:`load_weights_only`) from a file or a run folder
    (:func:`checkpoint_file`: its ``best.pt``); errors are ``DataError`` naming the file."""
    path = checkpoint_file(path)
    checkpoint = load_weights_only(path, "checkpoint", map_location)
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path} is not a dmlkit checkpoint (it holds a {type(checkpoint).__name__})")
    missing = [key for key in ("model", "model_config") if key not in checkpoint]
    if missing:
        raise DataError(f"{path} is not a dmlkit checkpoint (no {' or '.join(map(repr, missing))} entry)")
    return checkpoint


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
