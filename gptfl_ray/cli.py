"""``gptfl`` command line: one subcommand per step, plus ``run`` (all steps), ``sweep``, ``submit``, ``report``.

Every subcommand's handler lives next to the code it drives and is imported lazily, so ``gptfl --help``
stays fast. Expected failures (bad config, missing data, bad input files) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from gptfl_ray.config import ConfigError, load_config
from gptfl_ray.paths import DataNotFoundError

# subcommand -> (module, function, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("gptfl_ray.run", "run_command", "all four GPT-FL steps + baselines + report for one config"),
    "collect-labels": ("gptfl_ray.labels.collect", "collect_command", "private label union (IBLT + SecAgg)"),
    "generate": ("gptfl_ray.generate.pipeline", "generate_command", "prompts -> synthetic Parquet shards"),
    "pretrain": ("gptfl_ray.pretrain", "pretrain_command", "Ray Train on synthetic data -> init weights"),
    "federate": ("gptfl_ray.fl.runner", "federate_command", "federated training on Ray actors"),
    "sweep": ("gptfl_ray.sweep", "sweep_command", "Ray Tune sweep over algorithms × seeds × α"),
    "submit": ("gptfl_ray.submit", "submit_command", "submit a run or sweep to a Ray cluster as a job"),
    "report": ("gptfl_ray.report", "report_command", "tables and plots for a run folder"),
}


class UserError(Exception):
    """An error caused by the user's input; shown as one line, exit code 2."""


def _add_common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set fl.rounds=5 (repeatable)",
    )
    p.add_argument("--data-dir", default=None, help="dataset directory (default: $GPTFL_DATA_DIR)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help=COMMANDS["run"][2])
    _add_common(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    p.add_argument("--output", metavar="RUN_DIR", help="run folder (default: runs/<name>-<timestamp>)")

    p = sub.add_parser("collect-labels", help=COMMANDS["collect-labels"][2])
    _add_common(p)
    p.add_argument("--output", metavar="FILE", help="label list JSON (default: <output_dir>/labels.json)")

    p = sub.add_parser("generate", help=COMMANDS["generate"][2])
    _add_common(p)
    p.add_argument(
        "--output", metavar="DIR", help="synthetic data folder (default: <output_dir>/synthetic-<hash>)"
    )
    p.add_argument("--labels", metavar="FILE", help="label list JSON from collect-labels")

    p = sub.add_parser("pretrain", help=COMMANDS["pretrain"][2])
    _add_common(p)
    p.add_argument(
        "--synthetic", metavar="DIR", required=True, help="synthetic data folder from `gptfl generate`"
    )
    p.add_argument("--output", metavar="DIR", help="pretraining folder (weights, metrics, checkpoints)")

    p = sub.add_parser("federate", help=COMMANDS["federate"][2])
    _add_common(p)
    p.add_argument("--init", metavar="WEIGHTS", help="initial weights (safetensors); default random init")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted FL run from its checkpoint")
    p.add_argument("--output", metavar="RUN_DIR", help="FL run folder")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the config's first seed)")

    p = sub.add_parser("sweep", help=COMMANDS["sweep"][2])
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="restore the sweep and run only unfinished trials")
    p.add_argument("--smoke", action="store_true", help="tiny substitute sizes on the offline datasets")
    p.add_argument("--output", metavar="DIR", help="sweep folder")
    p.add_argument(
        "--shared",
        metavar="DIR",
        help="folder of shared inputs (synthetic data, pretrained weights), "
        "reusable across sweeps (default: <sweep folder>/shared)",
    )

    p = sub.add_parser("submit", help=COMMANDS["submit"][2])
    _add_common(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--sweep", action="store_true", help="submit `gptfl sweep` instead of `gptfl run`")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.add_argument("--extra-args", default="", help="extra arguments appended to the job's command")

    p = sub.add_parser("report", help=COMMANDS["report"][2])
    p.add_argument("run_dir", help="run folder written by `gptfl run`")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # bind to the current stderr even if an earlier call (or library) configured logging
    )
    if getattr(args, "data_dir", None):
        os.environ["GPTFL_DATA_DIR"] = args.data_dir
    module, func, _ = COMMANDS[args.command]
    try:
        # Validate the run config before importing anything heavy: typos fail in milliseconds.
        if args.command not in ("sweep", "report") and not (args.command == "submit" and args.sweep):
            args.cfg = load_config(args.config, args.overrides)
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args) or 0)
    except (ConfigError, DataNotFoundError, UserError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"gptfl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            "rerun with --resume RUN_DIR" if args.command in ("run", "federate") else "rerun the same command"
        )
        print(
            f"gptfl {args.command}: interrupted ({hint} to continue; finished work is kept)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
