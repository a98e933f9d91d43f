"""The ``hifuse`` command line: train, evaluate, predict, explain, export, info, benchmark,
demo-data.

Needs the ``train`` extra (``pip install 'hifuse-kernels[train]'``): torchvision, torchmetrics,
TensorBoard, tqdm and matplotlib; ``export`` needs the ``export`` extra. Problems with the
user's input end the program with a one-line message and exit status 2, never a traceback; a
closed output pipe (``| head``) or Ctrl-C ends it quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import CliError

COMMANDS = ("train", "evaluate", "predict", "explain", "export", "info", "benchmark", "demo_data")
EXTRA = {"torchvision", "torchmetrics", "tensorboard", "tqdm", "matplotlib", "PIL"}
EXPORT_EXTRA = {"onnx", "onnxscript", "onnxruntime"}


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's."""
    import importlib

    from .. import __version__

    p = argparse.ArgumentParser(prog="hifuse", description="Train and run HiFuse medical-image classifiers.")
    p.add_argument("--version", action="version", version=f"hifuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p, dict(sub.choices)


def given_options(argv: list[str], command: str) -> set[str]:
    """The options of ``command`` that ``argv`` sets explicitly (not by default)."""
    p, commands = parser()
    for action in commands[command]._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns)) - {"command", "run"}


def _quiet_stdout() -> None:
    """After a broken pipe: later writes (and the interpreter's final flush) go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation for an in-memory stdout
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        p, commands = parser()
        args, extra = p.parse_known_args(argv)
        if extra:
            commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        args.given = given_options(argv, args.command)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        warnings.formatwarning = lambda message, category, *rest: f"hifuse {args.command}: warning: {message}\n"
        return args.run(args)
    except CliError as e:
        print(f"hifuse{' ' + args.command if args else ''}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root in EXPORT_EXTRA:
            print(f"hifuse: error: {e.name} is missing; install the export extra: pip install 'hifuse-kernels[export]'",
                  file=sys.stderr)
            return 2
        if root in EXTRA:
            print(f"hifuse: error: {e.name} is missing; install the command line's extra: pip install 'hifuse-kernels[train]'",
                  file=sys.stderr)
            return 2
        raise
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("hifuse: interrupted", file=sys.stderr)
        return 130
