"""What the command lines (infer_npu.py, serve.py) share about talking to their user: the error of a bad command
line, exit codes, and library messages put in the terms of the script's flags."""

from __future__ import annotations

import argparse
import inspect
import re

from .. import synthesis
from . import model_loading

EXIT_OK, EXIT_RUNTIME, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
# Parameters of `inference` that the scripts spell differently; the others are the flags' own names (dest).
API_NAMES_OF_FLAGS = {"output_audio_path": "--output-path"}
QUOTES = "'\""


class UsageError(ValueError):
    """A bad command line or input file, with a message in the script's terms (exit code 2)."""


def in_flag_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message with the parameter names of `inference` and `model_loading.load_model` replaced by the
    parser's flags.

    `name=value` becomes `--flag value`; a bare name is replaced only when it contains "_" (so that plain words such
    as "text" or "mode" in a sentence stay).
    """
    by_dest = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    names = [*inspect.signature(synthesis.SynthesisMixin.inference).parameters,
             *inspect.signature(model_loading.load_model).parameters]
    for name in dict.fromkeys(names):
        flag = API_NAMES_OF_FLAGS.get(name) or by_dest.get(name)
        if flag is None:
            continue
        message = re.sub(rf"\b{name}=('[^'\s]*'|\"[^\"\s]*\"|[^\s;,]+)",
                         lambda match: f"{flag} {match.group(1).strip(QUOTES)}", message)
        if "_" in name:
            message = re.sub(rf"\b{name}\b", flag, message)
    return message


__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUNTIME", "EXIT_TERMINATED", "EXIT_USER", "UsageError",
           "in_flag_terms"]
