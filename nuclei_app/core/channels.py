"""Which channels hold a nuclear stain, chosen by name (DAPI, Histone, Hoechst, ...)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence
from nuclei_app.errors import BadDataError, UsageError


#: Channel-name aliases of nuclear stains, grouped by what they mark. Names are compared
#: after `_normalise_channel_name` (lower case; spaces, '-', '_', '.', brackets removed;
#: cycle prefixes such as "cycle1_" dropped).
NUCLEAR_STAIN_ALIASES: dict[str, tuple[str, ...]] = {
    "dapi": (
        "dapi",
        "hoechst",
        "hoechst33342",
        "hoechst33258",
        "ho33342",
        "dna",
        "nuclei",
        "nucleus",
        "nuclear",
        "draq5",
        "draq7",
        "sytox",
        "syto",
        "topro3",
        "redot1",
        "propidiumiodide",
        "pi",
    ),
    "histone": (
        "histone",
        "histoneh3",
        "histoneh2b",
        "histoneh1",
        "panhistone",
        "h3",
        "h2b",
        "h2a",
        "h1",
        "h4",
        "h2bgfp",
    ),
    "lamin": ("lamin", "laminb1", "lamina", "laminac", "lmnb1"),
}


# --------------------------------------------------------------------------------------
# Channels and intensity statistics
# --------------------------------------------------------------------------------------

_CYCLE_PREFIX = re.compile(r"^(?:cycle|cyc|round|rnd|r|c)\d+")


def _normalise_channel_name(name: str) -> str:
    text = re.sub(r"[\s\-_.()\[\]/:]+", "", str(name).lower())
    return _CYCLE_PREFIX.sub("", text) or text


def _alias_group(normalised: str) -> str | None:
    """The stain group (key of NUCLEAR_STAIN_ALIASES) a normalised channel name belongs to."""
    candidates = {normalised, re.sub(r"\d+$", "", normalised)}  # "DAPI_2" of a later cycle is DAPI
    for group, aliases in NUCLEAR_STAIN_ALIASES.items():
        for alias in aliases:
            if alias in candidates:
                return group
            # long aliases may carry a qualifier: "DAPI-cycle3", "Hoechst33342 (nuclei)"
            if len(alias) >= 4 and normalised.startswith(alias):
                return group
    return None


def stain_key(channel_name: str) -> str:
    """What a channel name stains, for comparing panels: "DAPI", "Hoechst 33342" -> "dapi".

    The alias group for known nuclear stains, else the normalised name.
    """
    normalised = _normalise_channel_name(channel_name)
    return _alias_group(normalised) or normalised


def select_nuclear_channels(
    channel_names: Sequence[str],
    requested: str | Sequence[str] | None = None,
    path: str | Path | None = None,
) -> list[int]:
    """Indices of the nuclear-stain channels, chosen by name.

    Parameters
    ----------
    channel_names : sequence of str
        Names of the slide's channels, in order.
    requested : str or sequence of str, optional
        ``"DAPI,Histone"`` or ``["DAPI", "Histone"]``: each item matches a channel name
        case-insensitively (ignoring spaces, '-', '_' and cycle prefixes); a stain alias
        such as ``"Hoechst"`` also matches a channel named ``"DAPI"``. None picks every
        channel named like a known nuclear stain, or channel 0 of a single-channel image.
    path : str or Path, optional
        Slide path, for the error message.

    Returns
    -------
    list of int
        Channel indices, in the requested (or channel) order, without duplicates.

    Raises
    ------
    BadDataError
        No channel matches; the message lists the available names and how to choose.
    """
    names = [str(name) for name in channel_names]
    normalised = [_normalise_channel_name(name) for name in names]
    available = ", ".join(names) if names else "(none)"
    how = "pass --nuclear-channels NAME[,NAME] with names from that list"
    if requested is None:
        chosen = [i for i, name in enumerate(normalised) if _alias_group(name) is not None]
        if not chosen and len(names) == 1:
            return [0]
        if not chosen:
            raise BadDataError(f"no channel is named like a nuclear stain (channels: {available}); {how}", path)
        return chosen
    items = [item.strip() for item in requested.split(",")] if isinstance(requested, str) else list(requested)
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise UsageError("--nuclear-channels is empty; give channel names such as DAPI,Histone", path)
    chosen: list[int] = []
    for item in items:
        wanted = _normalise_channel_name(item)
        exact = [i for i, name in enumerate(normalised) if name == wanted]
        if not exact:
            exact = [i for i, name in enumerate(names) if name.strip().lower() == item.lower()]
        if not exact and _alias_group(wanted) is not None:
            group = _alias_group(wanted)
            exact = [i for i, name in enumerate(normalised) if _alias_group(name) == group]
        if not exact:
            raise BadDataError(f"no channel matches {item!r} (channels: {available}); {how}", path)
        chosen.extend(i for i in exact if i not in chosen)
    return chosen

