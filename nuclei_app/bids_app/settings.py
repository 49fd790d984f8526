"""Settings of the BIDS App: argv of the BIDS-Apps form, label filters, config files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from nuclei_app.bids.discover import normalise_label
from nuclei_app.config import RunConfig, read_settings_file
from nuclei_app.errors import MissingInputError, UsageError


ANALYSIS_LEVELS: tuple[str, ...] = ("train", "participant", "group")


#: Options of `run` that take no value; every other ``--option`` takes one.
RUN_FLAGS = frozenset({"--skip-bids-validation", "--resume", "--no-resume", "--help"})


LABEL_OPTIONS = frozenset({"--participant-label", "--session-label", "--sample-label"})


_LABEL_KINDS = {"participant_label": "participant", "session_label": "session", "sample_label": "sample"}


# ======================================================================================
# Command line: the bare BIDS-Apps form and label lists
# ======================================================================================


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1


def _positional_indices(args: Sequence[str]) -> list[int]:
    indices, index = [], 0
    while index < len(args):
        token = args[index]
        if token == "--":
            indices.extend(range(index + 1, len(args)))
            break
        if _is_option(token):
            index += 1 if ("=" in token or token in RUN_FLAGS) else 2
            continue
        indices.append(index)
        index += 1
    return indices


def _split_label_lists(args: Sequence[str]) -> list[str]:
    """``--participant-label 01 02`` -> ``--participant-label 01 --participant-label 02``.

    Only after BIDS_DIR OUTPUT_DIR LEVEL were given: then a bare word after a label option
    can only be another label (before them it could be a positional argument).
    """
    out: list[str] = []
    positionals, index = 0, 0
    while index < len(args):
        token = args[index]
        if token in LABEL_OPTIONS and index + 1 < len(args):
            out += [token, args[index + 1]]
            index += 2
            while positionals >= 3 and index < len(args) and not _is_option(args[index]):
                out += [token, args[index]]
                index += 1
            continue
        if _is_option(token):
            width = 1 if ("=" in token or token in RUN_FLAGS) else 2
            out += list(args[index : index + width])
            index += width
            continue
        positionals += 1
        out.append(token)
        index += 1
    return out


def bids_app_argv(args: Sequence[str], commands: Sequence[str]) -> list[str]:
    """Rewrite a command line into the typer form of `nuclei-app`.

    ``nuclei-app BIDS_DIR OUTPUT_DIR LEVEL ...`` (the BIDS-Apps form, the container's entry
    point) becomes ``nuclei-app run BIDS_DIR OUTPUT_DIR LEVEL ...`` when the first word is
    neither a subcommand nor an option and three positional arguments are present; an
    unknown LEVEL is then reported by `run` (exit 17). Space-separated label lists after a
    label option are split into repeated options.
    """
    args = [str(arg) for arg in args]
    if args and args[0] not in commands and not _is_option(args[0]) and len(_positional_indices(args)) >= 3:
        args = ["run", *args]
    if args and args[0] == "run":
        args = ["run", *_split_label_lists(args[1:])]
    return args


def read_label_arguments(values: str | Sequence[str] | None, kind: str) -> tuple[str, ...] | None:
    """Labels from option values: ``01``, ``sub-01``, ``"01 02"``, ``01,02``, ``@FILE`` or a FILE path.

    A file holds labels one per line (commas and spaces also separate; ``#`` starts a
    comment line). A value is read as a file when it starts with ``@``, or when it is not
    a label list and names an existing file.

    Returns
    -------
    tuple of str or None
        Labels without prefix, unique, in the given order; None when ``values`` is None.

    Raises
    ------
    UsageError
        An empty list or a malformed label (``..``, path separators, non-alphanumerics).
    MissingInputError
        ``@FILE`` does not exist or cannot be read.
    """

    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    option = f"--{kind}-label"
    labels: list[str] = []
    for item in items:
        text = str(item).strip()
        source = None
        if text.startswith("@"):
            source = Path(text[1:])
        elif not re.fullmatch(r"[A-Za-z0-9,\s-]*", text) and Path(text).is_file():
            source = Path(text)
        if source is not None:
            try:
                content = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                reason = getattr(error, "strerror", None) or str(error)
                raise MissingInputError(f"cannot read the {option} file ({reason}); give a text file with one label per line", source) from None
            lines = [line for line in content.splitlines() if not line.strip().startswith("#")]
            pieces = [piece for line in lines for piece in re.split(r"[,\s]+", line) if piece]
            if not pieces:
                raise UsageError(f"the {option} file holds no label; write one label per line", source)
        else:
            pieces = [piece for piece in re.split(r"[,\s]+", text) if piece]
        labels.extend(normalise_label(piece, kind) for piece in pieces)
    if not labels:
        raise UsageError(f"{option} is empty; give a label such as 01 or leave the option out")
    return tuple(dict.fromkeys(labels))


# ======================================================================================
# Configuration
# ======================================================================================


def read_label_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with its label settings expanded by `read_label_arguments` (``@FILE``, lists, prefixes)."""
    expanded = dict(values)
    for key, kind in _LABEL_KINDS.items():
        if key in expanded:
            expanded[key] = read_label_arguments(expanded[key], kind)
    return expanded


def load_run_config(path: str | Path | None) -> RunConfig:
    """The `RunConfig` of a ``--config`` file (JSON, or TOML when it ends in ``.toml``); None: the defaults.

    Raises
    ------
    MissingInputError (66)
        The file does not exist or cannot be read.
    UsageError (64)
        Not valid JSON/TOML, unknown keys, wrong types (schema ``run_config``) or values a
        config refuses (the message names the file).
    """
    if path is None:
        return RunConfig()
    values = read_label_settings(read_settings_file(path, "run_config", "run config"))
    try:
        return RunConfig.from_settings(values)
    except UsageError as error:
        raise UsageError(f"{error.message}; fix the run config", path) from None
