"""The command line's arguments as a newcomer meets them: one ``error:`` line for a bad one, one line per option
in ``--help``, and release 0.1's spelling of LeNet read as today's."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bn_lightning.nn import legacy
from bn_lightning.training._private import known_subclasses, option_groups, option_strings

# Run configs renamed since release 0.1: a clear message instead of "file does not exist".
RENAMED_CONFIGS = {"seed_adam.yaml": "blog_adam.yaml", "seed_adam_scratch.yaml": "blog_adam_scratch.yaml"}


class _ArgumentParser(LightningArgumentParser):
    """A bad command line ends in one ``error:`` line that says what was wrong and how to fix it, without the
    usage dump (``--help`` shows that): an unknown option gets the closest valid one, a class-valued key whose
    class was not found (``--model.optimizer Sgd``) the classes it knows, when they are few."""

    def format_help(self) -> str:
        """A subcommand's options one line each (``fit --help`` was 1,665 lines, most of them every
        ``torch.nn.Module`` subclass): ``--<key>.help CLASS`` shows one class's options in full."""
        subcommand = self.prog.rsplit(" ", 1)[-1] in LightningCLI.subcommands()
        return compact_help(self) if subcommand else super().format_help()

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse parsing a part (a subcommand, a nested class): it handles this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {one_line(message, parser)}\n")
        sys.exit(2)


def compact_help(parser, width: int = 118) -> str:
    """Every option of ``parser`` on one line, its default and the first sentence of its help, by group."""
    lines = [f"usage: {parser.prog} [--config FILE] [--KEY VALUE ...]", "",
             "Each option with its default and the first sentence of its help. A class-valued option takes a class",
             "name or path; --KEY.help CLASS lists that class's own options (--model.net.help LeNet).", ""]
    for title, actions in option_groups(parser):
        shown = [action for action in actions if action.help != argparse.SUPPRESS and action.option_strings]
        if not shown:
            continue
        lines.append(title.split(":")[0].split(". ")[0].rstrip(".") + ":")
        for action in shown:
            name = max((o for o in action.option_strings if not o.endswith("+")), key=len, default=action.option_strings[0])
            default = _default(parser, action)
            summary = re.split(r"(?<=[.!?])\s|\s\(type:", " ".join(str(action.help or "").split()))[0].rstrip(".")
            text = f"  {name:<44} {f'[{default}] ' if default else ''}{summary}"
            lines.append(text if len(text) <= width else text[:width - 3] + "...")
        lines.append("")
    return "\n".join(lines)


def _default(parser, action) -> str:
    """An option's default as one short word: a class's name, a value; "" when there is none to show."""
    try:
        value = parser.get_default(action.dest)
    except (KeyError, TypeError, ValueError):
        return ""
    if isinstance(value, dict) or hasattr(value, "class_path"):
        value = value.get("class_path") if isinstance(value, dict) else value.class_path
        value = str(value).rsplit(".", 1)[-1]
    if value is None or value == argparse.SUPPRESS or isinstance(value, (list, tuple)) and not value:
        return ""
    if isinstance(value, (list, tuple)) and all(isinstance(item, dict) or hasattr(item, "class_path") for item in value):
        return f"{len(value)} classes"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def one_line(message: str, parser) -> str:
    """jsonargparse's message, nested over several lines, as one: the option's full name, what it expected and
    what it got, with the closest valid option for an unknown one and the classes a class-valued key takes."""
    unknown = re.match(r"unrecognized arguments: (--[\w.]+)", message)
    if unknown:
        close = difflib.get_close_matches(unknown[1], option_strings(parser), n=1, cutoff=0.6)
        return message + (f"; did you mean {close[0]}?" if close else "; --help lists the options")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    option = keys[0] + "".join(f".init_args.{key}" for key in keys[1:])
    expected = re.findall(r"Expected a (?:typing\.)?(Literal\[.*?\]|<class '(\w+)'>|[^:\n.]+)", message)
    given = re.search(r"(?:Given|Got) value: (.*)|but (\S+) either not accessible", message)
    found = re.search(r"File does not exist: (.*)", message)
    if found:
        return f"--{option} {found[1]}: no such file"
    known = known_subclasses(parser, keys[0])
    if known and known.count(",") < 30 and "Problem with given class_path" not in message:
        return f"--{option}: {given[1] or given[2] if given else 'that'} is not a class it knows; it takes one of: {known} " \
               "(a class name alone, as in SGD, will do)"
    if expected and given:
        kinds = [name or ("one of " + kind.removeprefix("Literal[").removesuffix("]") if kind.startswith("Literal")
                          else kind) for kind, name in expected]
        kinds = ["null" if kind == "NoneType" else kind for kind in dict.fromkeys(kinds)]
        return f"--{option}: expected {' or '.join(kinds)}, got {given[1] or given[2]}"
    return f"--{option}: " + " ".join(line.strip() for line in message.splitlines()[1:] if line.strip())


LENET_PATHS = {"bn_lightning.LeNet", "bn_lightning.nn.LeNet", "bn_lightning.nn.lenet.LeNet", "bn_lightning.model.LeNet"}
FLAT_FLAG = "--model.net.init_args."


def translate_legacy(args: list[str]) -> list[str]:
    """Release 0.1's LeNet spelling, in a config file (a run folder's config.yaml) or a flag
    (``--model.net.init_args.bn_momentum=0.01``), as today's, with a FutureWarning that shows it."""
    args, found = list(args), []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            at = i + 1 if arg == "--config" else i
            path = Path(args[at].removeprefix("--config="))
            if path.suffix in (".yaml", ".yml") and not path.is_file():
                renamed = RENAMED_CONFIGS.get(path.name)
                raise ValueError(f"--config {path}: no such file" + (
                    f"; it is {path.with_name(renamed)} since release 0.2" if renamed else
                    "; the run configs are in configs/ (python -m bn_lightning fit --config configs/lenet_bn_scratch.yaml)"))
            config = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") and path.is_file() else None
            net = (config.get("model") or {}).get("net") if isinstance(config, dict) else None
            if not (isinstance(net, dict) and net.get("class_path") in LENET_PATHS):
                continue
            init_args = net.get("init_args") or {}
            if net["class_path"] == "bn_lightning.model.LeNet" or legacy.uses_flat_arguments(init_args):
                net["class_path"], net["init_args"] = "bn_lightning.nn.LeNet", legacy.translate(init_args)
                text = yaml.safe_dump(config, sort_keys=False)
                args[at] = text if arg == "--config" else f"--config={text}"
                found.append(f"{path}: model.net is {net}")
        elif arg.startswith(FLAT_FLAG) and arg[len(FLAT_FLAG):].partition("=")[0] in legacy.FLAT:
            key, _, value = arg[len(FLAT_FLAG):].partition("=")
            new = legacy.FLAT[key][1]
            args[i] = (f'{FLAT_FLAG}norm_kwargs={{"{new}": null}}' if value in ("null", "None")
                       else f"{FLAT_FLAG}norm_kwargs.{new}={value}")
            found.append(f"{arg} is {args[i]}")
    for change in found:
        warnings.warn(f"release 0.1's LeNet arguments, read as today's: {change}", FutureWarning, stacklevel=2)
    return args
