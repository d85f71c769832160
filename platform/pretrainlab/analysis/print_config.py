"""The fully resolved config (``_base_`` files merged, ``--set`` overrides applied, defaults filled in) as YAML.

    python -m pretrainlab.analysis.print_config configs/resnet10t_1xb128_fmnist.yaml [--set optim.lr=0.05]

Printed and written to ``--out``: every key the experiment runs with, in the schema's
order, so two configs can be diffed and a file can be re-run as it is (it has no
``_base_``). The header comment names the source and its ``config.hash``, the tag each
training run carries in MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import yaml

from pretrainlab.analysis.outputs import add_output_arguments, publish
from pretrainlab.config import ConfigError, ExperimentConfig, load_config


def resolved_yaml(cfg: ExperimentConfig, source: str, overrides: list[str]) -> str:
    """``cfg`` as YAML with a comment header naming where it came from."""
    header = [f"# {cfg.name}: resolved from {source}"]
    header += [f"#   --set {item}" for item in overrides]
    header.append(f"# config.hash: {cfg.digest()}")
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    add_output_arguments(parser, "config.resolved.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = resolved_yaml(cfg, args.config, args.set)
    print(text, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    with contextlib.redirect_stdout(sys.stderr):  # stdout stays pure YAML
        publish(out, args, "print_config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
