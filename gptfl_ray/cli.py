"""``gptfl`` command line: one subcommand per step, plus ``run`` (all steps), ``sweep``, ``submit``, ``report``.

Every subcommand's handler lives next to the code it drives and is imported lazily, so ``gptfl --help``
stays fast. Before any work (and before Ray starts) the whole command is validated: the config of every step,
arm and grid point, the input files and the data (``_preflight``). Expected failures, the project's user errors
(``gptfl_ray.errors.UserError``: bad config, missing data, bad input files), print one line and exit 2; any other
exception is a bug and shows its traceback and a one-line hint (exit 1).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback
from typing import Any, NoReturn

from gptfl_ray.config import MAX_SEED, ConfigError, load_config
from gptfl_ray.console import log_handler, set_verbose
from gptfl_ray.errors import UserError, shorten

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

MAX_ERROR_CHARS = 1000  # an error line never echoes more of the user's input than this

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {shorten(message, MAX_ERROR_CHARS)} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED} (got {value})")
    return value


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
    parser = _Parser(prog="gptfl", description=__doc__.splitlines()[0])
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
    p.add_argument("--seed", type=_seed, default=None, help="seed (default: the config's first seed)")
    p.add_argument(
        "--synthetic", metavar="DIR", help="synthetic data folder, for public_data.source: synthetic"
    )

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
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain http:// address on another host (the job and token travel unencrypted)",
    )

    p = sub.add_parser("report", help=COMMANDS["report"][2])
    p.add_argument("run_dir", help="run folder written by `gptfl run`")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


# OSErrors that are the machine's or the user's doing (permissions, full disk, a file where a folder should be).
_ENVIRONMENT_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
}


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user error (also one raised inside a Ray task or actor), else None (a bug)."""
    cause = getattr(err, "cause", None)  # Ray's task/actor errors carry the original exception
    if isinstance(cause, UserError):
        err = cause
    if isinstance(err, UserError):
        text = str(err).strip()
        return shorten(text.splitlines()[0] if text else type(err).__name__, MAX_ERROR_CHARS)
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return shorten(f"{where}{err.strerror or err}", MAX_ERROR_CHARS)
    return None


def _preflight(args: Any) -> None:
    """Everything the command will need, checked before it starts work or Ray: the config of every step it runs
    (every arm, every grid point), its input files, the data and the partition of every seed."""
    if args.command == "submit":  # the job reads its API keys from the cluster's environment, not this one
        from gptfl_ray.transport import keys_from_another_environment

        with keys_from_another_environment():
            _check_command(args)
    else:
        _check_command(args)


def _check_command(args: Any) -> None:
    from gptfl_ray import validate

    cmd, cfg = args.command, getattr(args, "cfg", None)
    if cmd == "report":
        validate.check_run_folder(args.run_dir)
        return
    if cmd == "sweep" or (cmd == "submit" and args.sweep):
        from gptfl_ray.sweep import grid_points, load_sweep

        sweep_cfg, base = load_sweep(args.config, args.overrides, smoke=getattr(args, "smoke", False))
        points = grid_points(sweep_cfg, base)  # validate_run for every grid point
        if cmd == "sweep":
            validate.check_output_dir(args.output or base.output_dir, "sweep folder")
            if args.shared:
                validate.check_output_dir(args.shared, "shared inputs folder")
            validate.check_ray_address(base.ray_address)
            validate.check_points_data(points)
        return
    if cmd == "run":
        validate.validate_run(cfg)
    elif cmd == "collect-labels":
        validate.validate_run(cfg, steps=[])
        validate.check_labels(cfg, collect=True)
        validate.check_data(cfg, cfg.seeds[:1])
    elif cmd == "generate":
        validate.validate_run(cfg, steps=["generate"])
        if args.labels:
            from gptfl_ray.generate.pipeline import read_labels_file

            read_labels_file(args.labels)
        if cfg.prompts.num_per_class is None:  # prompts.scale reads the real class counts
            validate.check_data(cfg, [])
    elif cmd == "pretrain":
        validate.validate_run(cfg, steps=["pretrain"])
        validate.check_synthetic(args.synthetic, cfg)
    elif cmd == "federate":
        validate.validate_run(cfg, steps=["federate"], baselines=False)
        if cfg.public_data.source == "synthetic":
            if not args.synthetic:
                raise ConfigError(
                    "public_data.source: 'synthetic' needs --synthetic DIR (from `gptfl generate`)"
                )
            validate.check_synthetic(args.synthetic, cfg)
    elif cmd == "submit":
        validate.validate_run(cfg)  # the data lives on the cluster: not checked here
    if cmd in ("collect-labels", "generate", "pretrain", "federate"):
        output = getattr(args, "output", None) or getattr(args, "resume", None)
        if output and cmd == "collect-labels":  # --output names the labels file
            output = os.path.dirname(os.path.abspath(output))
        validate.check_output_dir(output or cfg.output_dir)
    if cmd != "submit":
        validate.check_ray_address(cfg.ray_address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)  # Ray's own logs on the console only with -v
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[log_handler(sys.stderr)],  # progress bars when stderr is a terminal
        force=True,  # bind to the current stderr even if an earlier call (or library) configured logging
    )
    if getattr(args, "data_dir", None):
        os.environ["GPTFL_DATA_DIR"] = args.data_dir
    module, func, _ = COMMANDS[args.command]
    try:
        # Validate the run config before importing anything heavy: typos fail in milliseconds.
        if args.command not in ("sweep", "report") and not (args.command == "submit" and args.sweep):
            args.cfg = load_config(args.config, args.overrides)
        _preflight(args)
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args) or 0)
    except Exception as err:
        message = user_message(err)
        if message is not None and not args.verbose:
            print(f"gptfl {args.command}: error: {message}", file=sys.stderr)
            return 2
        if message is not None:
            raise  # -v: the user error with its traceback
        traceback.print_exc()
        print(
            f"gptfl {args.command}: internal error ({type(err).__name__}): a bug, not a problem with your input; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
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
