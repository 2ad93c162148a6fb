"""A checkpoint's model for inference outside dmlkit: TorchScript or ONNX, with its preprocessing recorded.

The exported model maps a float32 batch ``N × C × S × S`` (the checkpoint's evaluation preprocessing
applied) to its embeddings ``N × D`` (L2-normalised when the model normalises); the batch size is free.
What the preprocessing is travels with the file twice: embedded (TorchScript: the extra file
``dmlkit.json``; ONNX: the ``dmlkit`` entry of the model's ``metadata_props``) and in a JSON sidecar
``<file>.json``. Both hold :func:`preprocessing_record` (image size, channels, colour mode, mean/std,
interpolation, the resize and crop, step by step) with the checkpoint's ``data_spec``
(``dmlkit.data.transforms.build("eval", **data_spec)`` rebuilds the pipeline exactly), the checkpoint's
:func:`~dmlkit.serving.index.fingerprint` (the same as its index's), the embedding size and the distance to
search with.

After writing, the exported model is run on a random batch of another size than the traced one and compared
with the checkpoint's model (TorchScript always; ONNX when onnxruntime is installed): a difference above
:data:`TOLERANCE` is an error, so a model whose tracing dropped a branch is not written silently.

ONNX export needs the optional package ``onnx`` (torch's exporter writes through it); ``onnxruntime``,
also optional, runs the check (``pip install 'dmlkit[onnx]'``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from dmlkit import __version__
from dmlkit.data import transforms
from dmlkit.errors import ConfigError, DataError, unknown_name_message
from dmlkit.files import write_atomic
from dmlkit.serving.index import fingerprint

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
FORMAT = "dmlkit-export"
FORMAT_VERSION = 1
#: The name of the metadata inside the exported file (TorchScript extra file ``dmlkit.json``, ONNX key).
METADATA_KEY = "dmlkit"
#: The largest |exported − checkpoint| embedding difference the export accepts (float32 reordering).
TOLERANCE = 1e-4
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an exported model: ``<file>.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _step(step: Any) -> dict[str, Any]:
    """One step of an evaluation pipeline as plain data another runtime can follow."""
    if isinstance(step, transforms.MatchChannels):
        return {
            "op": "convert",
            "mode": "L" if step.channels == 1 else "RGB",
            "how": "EXIF orientation applied, transparency composited onto white, gray by ITU-R 601-2 luma "
            "(PIL's convert)",
        }
    if isinstance(step, v2.ToImage):
        return {"op": "to_tensor", "dtype": "uint8", "layout": "CHW"}
    if isinstance(step, transforms.FitSize):
        return {
            "op": "resize",
            "size": [step.size, step.size],
            "interpolation": "bilinear",
            "antialias": True,
            "when": "the image is not already this size",
        }
    if isinstance(step, v2.Resize) and len(step.size) == 1:
        return {
            "op": "resize_shorter_side",
            "size": int(step.size[0]),
            "interpolation": step.interpolation.value,
            "antialias": bool(step.antialias),
        }
    if isinstance(step, v2.CenterCrop):
        return {"op": "center_crop", "size": [int(s) for s in step.size]}
    if isinstance(step, transforms.Normalise):
        return {
            "op": "normalize",
            "scale": 1 / 255,
            "mean": step.mean,
            "std": step.std,
            "formula": "(x/255 - mean) / std",
        }
    return {"op": type(step).__name__, "repr": repr(step)}


def preprocessing_record(data_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing of a checkpoint's ``data_spec`` as plain data: ``image_size``,
    ``channels``, ``color_mode``, ``mean``, ``std``, ``interpolation``, ``resize_shorter_side`` and
    ``center_crop`` (``None`` when the pipeline has none), every ``steps`` in order, and the ``data_spec``
    itself. The model's input is the result: float32, ``channels × image_size × image_size``."""
    pipeline = transforms.build("eval", **data_spec)
    steps = [_step(step) for step in pipeline.transforms]
    by_op = {step["op"]: step for step in steps}
    normalise = by_op["normalize"]
    resize = by_op.get("resize_shorter_side") or by_op.get("resize")
    return {
        "image_size": int(data_spec["image_size"]),
        "channels": int(data_spec.get("channels", 3)),
        "color_mode": by_op["convert"]["mode"],
        "mean": normalise["mean"],
        "std": normalise["std"],
        "interpolation": resize["interpolation"] if resize else data_spec.get("interpolation") or "bilinear",
        "resize_shorter_side": by_op.get("resize_shorter_side", {}).get("size"),
        "center_crop": by_op.get("center_crop", {}).get("size"),
        "steps": steps,
        "data_spec": dict(data_spec),
    }


def _metadata(
    model: torch.nn.Module, checkpoint: Mapping[str, Any], fmt: str, checkpoint_name: str
) -> dict[str, Any]:
    spec = checkpoint["data_spec"]
    size, channels = int(spec["image_size"]), int(spec.get("channels", 3))
    normalize = bool(checkpoint["model_config"].get("normalize", True))
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_format": fmt,
        "dmlkit_version": __version__,
        "checkpoint": checkpoint_name,
        "fingerprint": fingerprint(checkpoint),
        "input": {"name": INPUT_NAME, "shape": ["batch", channels, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(model.embedding_size)], "dtype": "float32"},
        "embedding_size": int(model.embedding_size),
        "normalized": normalize,
        "distance": "cosine" if normalize else "euclidean",
        "preprocessing": preprocessing_record(spec),
        "model_config": dict(checkpoint["model_config"]),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation notes about TorchScript (``jit.trace``/``save``/``load``) and the
    TorchScript-based ONNX exporter (still how these formats are written) and the tracer's notes on
    constant shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _example(metadata: Mapping[str, Any], batch: int, seed: int) -> torch.Tensor:
    _, channels, size, _ = metadata["input"]["shape"]
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    with _quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {f"{METADATA_KEY}.json": json.dumps(metadata, indent=1)}
    with _quiet():
        write_atomic(out, lambda handle: torch.jit.save(traced, handle, _extra_files=extra))


def require_exporter(fmt: str) -> None:
    """``ConfigError`` naming ``fmt`` if it is not one of :data:`FORMATS` or its exporter is missing (ONNX:
    the ``onnx`` package, which torch's exporter writes through)."""
    if fmt not in FORMATS:
        raise ConfigError(unknown_name_message("export format", fmt, FORMATS))
    if fmt == "onnx":
        try:
            importlib.import_module("onnx")
        except ImportError as exc:
            raise ConfigError(
                "ONNX export needs the optional package onnx, which is not installed: pip install "
                "'dmlkit[onnx]' (or onnx; onnxruntime to check the written model)"
            ) from exc


def _onnx(
    model: torch.nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any], opset: int
) -> None:
    onnx = importlib.import_module("onnx")  # present: require_exporter
    with tempfile.TemporaryDirectory(prefix=".dmlkit-export-", dir=out.parent) as tmp:
        path = Path(tmp) / "model.onnx"
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    write_atomic(out, lambda handle: handle.write(proto.SerializeToString()))


def _run_exported(path: Path, fmt: str, images: torch.Tensor) -> np.ndarray | None:
    """The exported model's embeddings of ``images`` (``None``: no runtime for ``fmt`` installed)."""
    if fmt == "torchscript":
        with torch.no_grad(), _quiet():
            return torch.jit.load(str(path), map_location="cpu")(images).numpy()
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


def export_model(
    model: torch.nn.Module,
    checkpoint: Mapping[str, Any],
    out: str | Path,
    fmt: str,
    *,
    checkpoint_name: str = "",
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """Write ``model`` (rebuilt from ``checkpoint``, :func:`dmlkit.cli.common.load_model`) to ``out`` as
    ``fmt`` (:data:`FORMATS`) with its metadata embedded and in the sidecar (:func:`sidecar_path`), then
    check the written model against ``model`` on a random batch. Returns the metadata, with
    ``max_abs_difference`` of that check (``None``: ONNX without onnxruntime to run it)."""
    require_exporter(fmt)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    metadata = _metadata(model, checkpoint, fmt, checkpoint_name)
    example = _example(metadata, 2, seed=0)
    with torch.no_grad():
        if fmt == "torchscript":
            _torchscript(model, example, out, metadata)
        else:
            _onnx(model, example, out, metadata, opset)
        check = _example(metadata, 3, seed=1)  # another batch size: the batch dimension must stay free
        expected = model(check).numpy()
    got = _run_exported(out, fmt, check)
    difference = None if got is None else float(np.abs(got - expected).max())
    if difference is not None and not difference <= TOLERANCE:
        out.unlink(missing_ok=True)
        raise DataError(
            f"the exported {fmt} model's embeddings differ from the checkpoint's by up to {difference:.3g} "
            f"(tolerance {TOLERANCE}); {out} was not kept"
        )
    write_atomic(sidecar_path(out), lambda handle: handle.write(json.dumps(metadata, indent=1).encode()))
    return {**metadata, "max_abs_difference": difference}


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model: its sidecar, else what the file embeds. ``DataError`` if neither."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    if path.suffix == ".onnx":
        try:
            onnx = importlib.import_module("onnx")
        except ImportError as exc:
            raise DataError(f"no sidecar {sidecar}; reading the metadata inside {path} needs onnx") from exc
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if METADATA_KEY in props:
            return json.loads(props[METADATA_KEY])
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            with _quiet():
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError) as exc:
            raise DataError(f"{path} is not a TorchScript file: {str(exc).strip().splitlines()[0]}") from exc
        if extra[f"{METADATA_KEY}.json"]:
            return json.loads(extra[f"{METADATA_KEY}.json"])
    raise DataError(f"{path} holds no dmlkit metadata and has no sidecar {sidecar}")


__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "METADATA_KEY",
    "TOLERANCE",
    "export_model",
    "load_metadata",
    "preprocessing_record",
    "require_exporter",
    "sidecar_path",
]
