"""``hifuse export``: a checkpoint as an ONNX file or a ``torch.export`` program, for deployment.

Both hold the eager modules (the fused ops are this library's, not ONNX's), with the batch
dimension left dynamic; the image side is fixed at the run's size.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .. import config
from . import models, options, preprocess
from .errors import CliError

EXTENSIONS = {"onnx": ".onnx", "pt2": ".pt2"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint as ONNX or a torch.export program", formatter_class=options.Formatter,
                       description="Exports the eager model with a dynamic batch axis. ONNX needs the export extra: "
                                   "pip install 'hifuse-kernels[export]'.")
    p.add_argument("--checkpoint", required=True, help="best_model.pth, last.pth or a published checkpoint")
    p.add_argument("--format", choices=["onnx", "pt2"], required=True, help="onnx (ONNX Runtime, ...) or pt2 (torch.export.load)")
    p.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--img-size", type=int, help="input side (default: the run's settings.json, else 224)")
    p.add_argument("--classes", help="class names in the checkpoint's order (default: classes.json beside the checkpoint)")
    p.add_argument("--trust-checkpoint", action="store_true", help="the checkpoint may hold Python objects besides tensors")
    p.set_defaults(run=run)


def export_onnx(model: torch.nn.Module, x: torch.Tensor, out: Path) -> None:
    import onnx  # noqa: F401  (the extra's packages, named when missing)
    import onnxscript  # noqa: F401

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
    program.save(str(out))


def export_pt2(model: torch.nn.Module, x: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(out))


def run(args) -> int:
    out = Path(args.out)
    ext = EXTENSIONS[args.format]
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; name a {ext} file")
    if out.suffix.lower() != ext:
        raise CliError(f"--out {out}: a {args.format} export is a {ext} file")
    loaded = models.load_for_inference(args.checkpoint, args.classes, torch.device("cpu"), args.trust_checkpoint)
    pre = preprocess.resolve(loaded.settings, args.img_size, None)
    model = loaded.model.float().eval()
    x = torch.randn(2, 3, pre.img_size, pre.img_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with config.use_fused(False), torch.no_grad():
        try:
            (export_onnx if args.format == "onnx" else export_pt2)(model, x, out)
        except ModuleNotFoundError:
            raise
        except Exception as e:
            raise CliError(f"export failed: {type(e).__name__}: {models.first_line(e)}") from None
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps({"classes": loaded.classes, "preprocess": pre.to_dict(), "input": "image",
                                   "shape": ["batch", 3, pre.img_size, pre.img_size], "output": "logits"}, indent=1) + "\n")
    print(f"wrote {out} ({args.format}, batch dynamic, {pre.img_size}x{pre.img_size} inputs) and {sidecar}")
    return 0
