"""Random streams: every random draw of a run comes from one seed, split by purpose.

One ``numpy.random.SeedSequence(seed)`` is the root; each purpose gets its own child (its
``spawn_key``), and a purpose that needs one stream per item (an image, a head) keys it
further. Streams are therefore independent of each other and of the order in which they are
created, and the same seed gives the same draws on any machine.
"""
from __future__ import annotations

import numpy as np

#: Purposes that draw random numbers; the position is the child's spawn key.
STREAMS: tuple[str, ...] = ("training_tiles", "batches", "pseudo_label_views", "framework", "qc_noise_crops",
                             "qc_teacher_tiles")


def seed_sequence(seed: int, stream: str, *key: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``stream`` (one of `STREAMS`), optionally keyed by integers."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {', '.join(STREAMS)}")
    return np.random.SeedSequence(int(seed), spawn_key=(STREAMS.index(stream), *(int(k) for k in key)))


def generator(seed: int, stream: str, *key: int) -> np.random.Generator:
    """A numpy ``Generator`` on ``stream`` (e.g. ``generator(0, "pseudo_label_views", image, head)``)."""
    return np.random.default_rng(seed_sequence(seed, stream, *key))


def framework_seed(seed: int) -> int:
    """A 32-bit seed for libraries with global generators (torch, numpy's legacy global state)."""
    return int(seed_sequence(seed, "framework").generate_state(1)[0])
