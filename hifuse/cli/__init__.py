"""The ``hifuse`` command line: train, evaluate, predict, explain, benchmark, demo-data.

Needs the ``train`` extra (``pip install 'hifuse-kernels[train]'``): torchvision, torchmetrics,
TensorBoard, tqdm and matplotlib. Problems with the user's input end the program with a
one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .errors import CliError

COMMANDS = ("train", "evaluate", "predict", "explain", "benchmark", "demo_data")
EXTRA = {"torchvision", "torchmetrics", "tensorboard", "tqdm", "matplotlib", "PIL"}


def parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="hifuse", description="Train and run HiFuse medical-image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        warnings.formatwarning = lambda message, category, *rest: f"hifuse {args.command}: warning: {message}\n"
        return args.run(args)
    except CliError as e:
        print(f"hifuse{' ' + args.command if args else ''}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in EXTRA:
            print(f"hifuse: error: {e.name} is missing; install the command line's extra: pip install 'hifuse-kernels[train]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("hifuse: interrupted", file=sys.stderr)
        return 130
