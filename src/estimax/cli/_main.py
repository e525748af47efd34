"""The command line: the parser, dispatch to a subcommand, and every error mapped to one
message and an exit status (see the package's docstring)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from importlib.metadata import version

from .._errors import EstimaxError
from ..text import TextError
from ._demo import _cmd_demo
from ._errors import _EXIT_ERROR, _EXIT_INTERNAL, _EXIT_OK, _EXIT_USAGE, _Fail, _Invocation
from ._plan import _cmd_check, _cmd_explain, _site_location
from ._run import _cmd_run

_OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and 2**32 - 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _learning_rate(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the steps, above 0 and at most 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an internal error",
    )
    parser = argparse.ArgumentParser(
        prog="estimax",
        description="Check, explain and train objective files written in the estimax language "
        "(see docs/objective-language.md).",
        epilog="exit status: 0 ok, 1 an error in the file/data/checkpoint, 2 a usage error, "
        "3 an internal error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show the Python traceback of an internal error"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # check, explain and run read objective files: the import opt-in is theirs
    imports = argparse.ArgumentParser(add_help=False)
    imports.add_argument(
        "--allow-import",
        metavar="MODULE|PATH",
        action="append",
        default=[],
        help="let FILE import from this module (and its submodules), or this Python file or folder, "
        "beyond the defaults (numerical modules; .py files in FILE's folder); repeatable. "
        "Importing runs the module's or file's code",
    )

    p = sub.add_parser(
        "check",
        parents=[common, imports],
        help="parse and check a file; print its estimator plan",
        description="Parse FILE, resolve its names, stage the objective and its gradient "
        "estimator (checking shapes and types) and print the estimator plan and certificate.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument("--data", metavar="DATA.npz", help="take the named sizes (real[N]) from these arrays")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "explain",
        parents=[common, imports],
        help="the per-site table and certificate",
        description="Print the per-site table of FILE's estimator (each random choice, its "
        "line, distribution and gradient strategy) and its certificate; with --variance, "
        "how much gradient variance each site contributes at the initial (or given) parameters.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument(
        "--data", metavar="DATA.npz", help="the data (needed with --variance when FILE declares data)"
    )
    p.add_argument(
        "--params", metavar="PARAMS.npz", help="parameters to explain at (e.g. a run's params.npz)"
    )
    p.add_argument("--variance", action="store_true", help="measure each site's gradient variance")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the variance measurement (default: 0)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "run",
        parents=[common, imports],
        help="train the parameters of a file's objective",
        description="Train FILE's parameters with estimax.fit, with a progress bar when stderr is a "
        "terminal. The whole state is checkpointed to DIR/checkpoint/ after every chunk and "
        "on Ctrl-C; running the same command again resumes from it. At the end, "
        "writes DIR/params.npz, DIR/history.npy and DIR/loss.png.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument("--data", metavar="DATA.npz", help="the data: one array per `data` declaration")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--optimizer", choices=_OPTIMIZERS, default="adam", help="the optimizer (default: adam)")
    p.add_argument("--lr", type=_learning_rate, default=1e-2, help="learning rate (default: 0.01)")
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the estimator's random numbers (default: 0)"
    )
    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=100,
        help="steps per compiled chunk, and between checkpoints (default: 100)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: out/<file name>)")
    p.add_argument("--fresh", action="store_true", help="start over, ignoring a checkpoint in DIR")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--progress", action="store_true",
                       help="show progress also when stderr is not a terminal: a plain line every 10 seconds "
                       "(default: a bar on a terminal, nothing in a log or pipe)")
    shown.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--average", metavar="FRACTION", type=_fraction, default=None,
                   help="Polyak averaging: write the mean of the parameters over the last FRACTION of the "
                   "steps (e.g. 0.5: the second half) instead of the last iterate")
    p.add_argument(
        "--tracking",
        choices=("auto", "none", "scgd", "sox", "msvr"),
        default="auto",
        help="for a nonlinear function of an expectation (`log(expect ...)`): how it is estimated "
        "across steps (default: auto, SCGD where the file has one; none: the plug-in estimate, biased)",
    )
    p.add_argument(
        "--solver",
        choices=("auto", "exact_al", "al", "stochastic"),
        default="auto",
        help="for a file with constraints: the solver (default: auto, chosen from the problem)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="fit the demo mixture and report the result",
        description="Fit a two-component Gaussian mixture (an objective file shipped with "
        "estimax, with a discrete and a continuous latent) to generated data: prints the "
        "plan, trains, and compares the fit with the truth. Writes the file, the data and "
        "the run's outputs to DIR.",
    )
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--lr", type=_learning_rate, default=0.1, help="Adam's learning rate (default: 0.1)")
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the estimator's random numbers (default: 0)"
    )
    p.add_argument("--chunk", type=_positive_int, default=100, help="steps per compiled chunk (default: 100)")
    p.add_argument("--n", type=_positive_int, default=200, help="number of data points (default: 200)")
    p.add_argument(
        "--out", metavar="DIR", default=os.path.join("out", "demo"), help="output folder (default: out/demo)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    try:
        return version("estimax")
    except Exception:  # noqa: BLE001 -- not installed: the source tree's version
        return "unknown"


def _exit_status(code) -> int:
    if code is None:
        return _EXIT_OK
    return code if isinstance(code, int) else _EXIT_USAGE


def _paragraph(message: str) -> str:
    return "\n".join(line for line in message.strip().splitlines() if line.strip()) or "(no message)"


def _estimax_error(e: Exception, invocation: _Invocation) -> str:
    """An estimax error as one paragraph naming the file; at the site's line when it names one."""
    message = _paragraph(str(e))
    program = invocation.program
    if program is not None:
        for name in re.findall(r"'([^'\s]+)'", message):
            at = _site_location(program, name)
            if at is not None:
                line, column = at
                first, _, rest = message.partition("\n")
                located = program.error(
                    first, line=line, column=column, end_column=column + len(name.rsplit("/", 1)[-1])
                )
                return str(located) + ("\n" + rest if rest else "")
    where = invocation.path or "estimax"
    return f"{where}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run the ``estimax`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return _exit_status(e.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE
    invocation = _Invocation()
    try:
        try:
            return args.func(args, invocation)
        except _Fail as e:
            print(f"estimax: error: {e.message}", file=sys.stderr)
            return e.code
        except TextError as e:
            print(str(e), file=sys.stderr)
            if invocation.note:
                print(invocation.note, file=sys.stderr)
            return _EXIT_ERROR
        except EstimaxError as e:
            print(_estimax_error(e, invocation), file=sys.stderr)
            return _EXIT_ERROR
        except RecursionError:
            print(
                f"estimax: error: {invocation.path}: the program is too deep for estimax's analysis "
                "(Python's recursion limit was reached outside the statements it can locate); this is a "
                "limit of estimax, not a mistake in the file: please report it with the file",
                file=sys.stderr,
            )
            return _EXIT_ERROR
        except SystemExit as e:  # from Python code the file imports
            print(
                f"estimax: error: {invocation.path}: Python code imported by the file called "
                f"sys.exit({e.code!r})",
                file=sys.stderr,
            )
            return _EXIT_ERROR
        except Exception as e:  # the device ran out of memory: the sizes are too large
            if "RESOURCE_EXHAUSTED" not in str(e) or type(e).__name__ not in (
                "JaxRuntimeError",
                "XlaRuntimeError",
            ):
                raise
            print(
                f"estimax: error: {invocation.path}: out of memory: {_paragraph(str(e)).splitlines()[0]}",
                file=sys.stderr,
            )
            return _EXIT_ERROR
    except KeyboardInterrupt:
        print("estimax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `estimax explain FILE | head`: quiet, as other tools are
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return _EXIT_ERROR
    except Exception as e:  # a bug of estimax: one line, not a traceback
        if args.debug:
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"estimax: internal error: {type(e).__name__}: {detail}"
            " (run with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return _EXIT_INTERNAL

