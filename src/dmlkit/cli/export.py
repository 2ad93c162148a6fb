"""dmlkit export: a checkpoint's model as TorchScript or ONNX for inference without dmlkit, with its
evaluation preprocessing recorded (inside the file and in the sidecar <out>.json: image size, channels,
mean/std, interpolation, resize and crop). The input is a float32 N × C × S × S batch, preprocessed as
recorded; the output its N × D embeddings. The written model is checked against the checkpoint on a random
batch (ONNX: when onnxruntime is installed). See docs/serving.md."""

from __future__ import annotations

import argparse

import torch

from dmlkit.cli.common import add_checkpoint_argument, load_model
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.serving import export as serving_export
from dmlkit.train import checkpoint as ckpt


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser(
        "export", help="export a checkpoint's model (TorchScript, ONNX)", description=__doc__
    )
    add_checkpoint_argument(parser)
    parser.add_argument("--format", required=True, choices=serving_export.FORMATS, help="torchscript or onnx")
    parser.add_argument("--out", required=True, help="the file to write (its sidecar: <out>.json)")
    parser.add_argument(
        "--opset",
        type=positive_int,
        default=serving_export.DEFAULT_OPSET,
        help=f"ONNX opset version ({serving_export.DEFAULT_OPSET})",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    serving_export.require_exporter(args.format)  # a missing onnx package fails before the model loads
    model, checkpoint = load_model(args.checkpoint, torch.device("cpu"))
    file = ckpt.checkpoint_file(args.checkpoint).resolve()
    metadata = serving_export.export_model(
        model, checkpoint, args.out, args.format, checkpoint_name=str(file), opset=args.opset
    )
    shape = " × ".join(str(s) for s in metadata["input"]["shape"])
    difference = metadata["max_abs_difference"]
    checked = (
        "not checked (onnxruntime is not installed)"
        if difference is None
        else f"max |difference| to the checkpoint {difference:.2g}"
    )
    print(
        f"wrote {args.out} ({args.format}: {shape} float32 images → {metadata['embedding_size']}-d "
        f"embeddings, {metadata['distance']}; {checked}); preprocessing in "
        f"{serving_export.sidecar_path(args.out)}"
    )
    return 0
