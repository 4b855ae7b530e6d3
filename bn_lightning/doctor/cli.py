"""``python -m bn_lightning doctor MODULE:FACTORY [--input-shape N C H W]``: check a model built by any importable
factory (``torchvision.models:resnet18``) and print the findings as a table. Exits with 1 when a finding is an
error, 0 otherwise, and 2 with one ``error:`` line on bad input."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

import torch

from bn_lightning.doctor.checks import check
from bn_lightning.doctor.findings import CODES, Finding

__all__ = ["main", "table"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"error: {message} (python -m bn_lightning doctor --help shows the options)\n")
        sys.exit(2)


def _parser() -> _Parser:
    parser = _Parser(prog="python -m bn_lightning doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("factory", metavar="MODULE:FACTORY",
                        help="an importable callable that returns the model, e.g. torchvision.models:resnet18")
    parser.add_argument("--input-shape", type=int, nargs="+", metavar="DIM",
                        help="shape of a random example input (e.g. 2 3 224 224): runs the probe, one training-mode "
                             "forward and backward and one eval-mode forward; without it, static checks only")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="CODE", help="codes to leave out, e.g. BN005")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed before building the model and its input")
    return parser


def _build(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r} is not MODULE:FACTORY; write it as torchvision.models:resnet18")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} ({err}); is it installed, or on PYTHONPATH?") from err
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"{module_name} has no attribute {attribute!r}; check the name after the colon")
        factory = getattr(factory, part)
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module; name a model class or a "
                         "function that returns one")
    return model


def table(findings: list[Finding]) -> str:
    """The findings as rows of code, severity, layers and what is wrong (one row for the layers that share a
    message), then each code's fix and link once."""
    if not findings:
        return "No batch-norm mistake found."
    rows: dict[tuple[str, str, str], list[str]] = {}
    for f in findings:
        rows.setdefault((f.code, f.severity, f.message), []).append(f.layer or "(model)")
    layers = {key: ", ".join(names) for key, names in rows.items()}
    width = max(len(text) for text in layers.values())
    lines = [f"{'code':<6} {'severity':<8} {'layers':<{width}}  what is wrong"]
    for (code, severity, message), text in layers.items():
        lines.append(f"{code:<6} {severity:<8} {text:<{width}}  {message}")
    lines += ["", "How to fix:"]
    for code in sorted({f.code for f in findings}):
        first = next(f for f in findings if f.code == code)
        lines.append(textwrap.fill(f"{code} ({CODES[code][1]}): {first.fix} See {first.link}", width=110,
                                   subsequent_indent="      "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [code for code in args.ignore if code not in CODES]
    if unknown:
        sys.stderr.write(f"error: --ignore {' '.join(unknown)}: the codes are BN001 to BN{len(CODES):03d}\n")
        return 2
    if args.input_shape is not None and any(d < 1 for d in args.input_shape):
        sys.stderr.write(f"error: --input-shape {' '.join(map(str, args.input_shape))}: every dimension must be "
                         "positive\n")
        return 2
    torch.manual_seed(args.seed)
    try:
        model = _build(args.factory)
        example = None if args.input_shape is None else torch.randn(args.input_shape)
        findings = check(model, example, ignore=args.ignore)
    except (ValueError, RuntimeError, TypeError) as err:
        message = " ".join(str(err).split())
        sys.stderr.write(f"error: {message}\n")
        return 2
    print(table(findings))
    if args.input_shape is None:
        print("\n(static checks only: --input-shape runs the probe too)")
    return 1 if any(f.severity == "error" for f in findings) else 0
