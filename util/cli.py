"""What every script shares: the model arguments, ``-v``, logging, and how errors end the script."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable, Optional, Sequence

from util.errors import ECEError

DEFAULT_MODEL = "smollm2-135m"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log details, and print the traceback of an error")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model_name``, ``--dtype``, ``--device`` and ``-v``, with the same defaults in every script."""
    parser.add_argument("--model_name", default=DEFAULT_MODEL,
                        help=f"embedded name ({DEFAULT_MODEL}, the default), hub id or local folder")
    parser.add_argument("--dtype", default="auto",
                        help="auto (float32 on CPU, bfloat16 or float16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    add_verbose_argument(parser)


def script_parser(description: str, results_file: bool = False) -> argparse.ArgumentParser:
    """A script's parser with the arguments every script shares: the model arguments, ``--data_dir`` and,
    for scripts that write one results file, ``--out``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data_dir", default=None, help="folder with the data files (else ECE_DATA_DIR, globals.yml)")
    if results_file:
        parser.add_argument("--out", default=None, help="JSON file for the results")
    return parser


def setup_logging(verbose: bool, level: int = logging.WARNING) -> None:
    """``level`` for a normal run, DEBUG with ``-v`` (no effect when logging is already configured)."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=LOG_FORMAT)


def _asks_verbose(argv: Optional[Sequence[str]]) -> bool:
    args = sys.argv[1:] if argv is None else list(argv)
    return any(a in ("-v", "--verbose") for a in args)


def run_script(main: Callable, argv: Optional[Sequence[str]] = None, on_interrupt: Optional[str] = None) -> int:
    """Run a script's ``main(argv)``; returns the exit status.

    A project error (:class:`util.errors.ECEError`) ends with its one-line message and status 2 (with the
    traceback under ``-v``); any other exception is a bug and propagates with its traceback. An interrupt
    prints ``on_interrupt`` and returns 130 when that message is given, else propagates.
    """
    try:
        main(argv)
    except ECEError as e:
        if _asks_verbose(argv):
            traceback.print_exc(file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(on_interrupt, file=sys.stderr)
        return 130
    return 0
