"""``pretrainlab TOOL [ARGS...]``: one command for the analysis toolbox.

    pretrainlab --help                 # the tools, one line each
    pretrainlab flops resnet50         # runs pretrainlab.analysis.flops.main(["resnet50"])
    pretrainlab flops --help           # the tool's own options

A tool is a module with ``main(argv) -> int``; ``TOOLS`` maps its name to the module and a
one-line help. A tool's module is imported only when that tool runs, so one tool that
cannot be imported never breaks the others. Add a tool by adding a line to ``TOOLS``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

TOOLS: dict[str, tuple[str, str]] = {
    "flops": ("pretrainlab.analysis.flops", "params and FLOPs (MACs, as MMPreTrain) of a timm model or a config"),
    "speed": ("pretrainlab.analysis.speed", "images/s of a model's forward pass at several batch sizes"),
    "schedule": ("pretrainlab.analysis.schedule", "lr, momentum and weight decay per iteration of a config, plotted"),
    "print_config": ("pretrainlab.analysis.print_config", "the fully resolved config (bases, overrides) as YAML"),
    "verify_dataset": ("pretrainlab.analysis.verify_dataset", "check every shard and decode every row of a dataset"),
    "browse": ("pretrainlab.analysis.browse", "a grid of training samples as the model sees them"),
    "confusion_matrix": ("pretrainlab.analysis.confusion_matrix", "confusion matrix of a model on a dataset split"),
    "tsne": ("pretrainlab.analysis.tsne", "t-SNE of a model's features on a dataset split"),
    "cam": ("pretrainlab.analysis.cam", "Grad-CAM class activation maps of a classifier on a dataset split"),
    "outbox": ("pretrainlab.tracking.outbox", "replay metrics queued while MLflow was unreachable into MLflow"),
}


def usage() -> str:
    width = max(map(len, TOOLS))
    lines = [
        "usage: pretrainlab TOOL [ARGS...]",
        "",
        "PretrainLab's analysis toolbox; `pretrainlab TOOL --help` shows a tool's options.",
        "",
        "tools:",
        *(f"  {name:<{width}}  {help_line}" for name, (_, help_line) in TOOLS.items()),
    ]
    return "\n".join(lines)


def run_tool(name: str, argv: list[str]) -> int:
    """Import the tool's module and call its ``main(argv)``; its exit code (argparse's exits included)."""
    module_name = TOOLS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        print(f"error: tool {name!r} cannot be loaded ({module_name}): {err}", file=sys.stderr)
        return 2
    if not callable(getattr(module, "main", None)):
        print(f"error: tool {name!r}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    program = sys.argv[0]
    sys.argv[0] = f"pretrainlab {name}"  # argparse's prog: usage lines read "pretrainlab TOOL ..."
    try:
        code = module.main(argv)
    except SystemExit as exit_:  # --help, or an argument argparse rejected
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except BrokenPipeError:  # output piped into `head` and the like, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    finally:
        sys.argv[0] = program
    return 0 if code is None else int(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help") and not rest:
        print(usage())
        return 0
    if name == "help":
        name, rest = rest[0], ["--help"]
    if name not in TOOLS:
        close = difflib.get_close_matches(name, TOOLS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        print(f"error: unknown tool {name!r}{hint} (tools: {', '.join(TOOLS)})", file=sys.stderr)
        return 2
    return run_tool(name, rest)


if __name__ == "__main__":
    sys.exit(main())
