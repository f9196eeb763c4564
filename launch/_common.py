"""What every launcher shares: argparse with `--verbose`, dependencies' INFO logs off
without it, and a progress line around long work (gamma_mod_jax.progress)."""

from __future__ import annotations

import argparse
import logging
import os

from gamma_mod_jax.progress import progress  # noqa: F401 - re-exported for the launchers

# Python loggers of the dependencies that log at INFO (Orbax alone: ~40 lines per checkpoint).
DEPENDENCY_LOGGERS = ("absl", "orbax", "jax", "grain", "transformers", "tensorflow", "etils")


def parser(doc: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser described by the first line of the launcher's docstring, with `--verbose`."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0], **kwargs)
    p.add_argument("--verbose", action="store_true",
                   help="keep the INFO logs of the dependencies (absl, Orbax, jax/XLA, Grain, transformers); "
                        "without it only their warnings and errors show")
    return p


def set_dependency_logging(verbose: bool) -> None:
    """Dependencies' INFO logs on (`verbose`) or off (WARNING and above only): Python
    loggers, absl's verbosity, and XLA's C++ logs (TF_CPP_MIN_LOG_LEVEL, read when jax
    starts its backend: call this before the first device use)."""
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    for name in DEPENDENCY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)


def parse_args(p: argparse.ArgumentParser, argv=None, *, known: bool = False):
    """p.parse_args(argv) (`known`: parse_known_args, (args, the rest)), then the
    dependencies' logging as `--verbose` says."""
    parsed = p.parse_known_args(argv) if known else p.parse_args(argv)
    set_dependency_logging((parsed[0] if known else parsed).verbose)
    return parsed
