"""The independent random streams of a run, all derived from the config's seed.

Every random choice draws from a generator seeded by ``(seed, stream, *more)`` (numpy's ``SeedSequence``
mixes the whole sequence), so adding a stream or drawing more from one never shifts another; ``more``
separates the draws inside a stream (a round, a client, an expert). Each stream is declared here once.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    LONGTAIL = 1  # which images the long-tailed subset keeps
    PARTITION = 2  # the client partition
    COHORT = 3  # each round's sampled clients (GBME: each expert's cohort)
    CLIENT = 4  # a client's batch order and augmentation, per (round, client)
    INIT = 5  # the model's initial weights
    CENTRAL = 6  # the centralized run's batch order and augmentation
    METHOD = 7  # a centralized method's own draws (mixup, classifier re-initialisation), under CENTRAL
    DP = 8  # the server's DP noise, per (round, release)
    CCVR = 9  # CCVR's virtual features and classifier re-fit, per round
    CREFF = 10  # CReFF's federated-feature initialisation (round 0) and classifier re-training, per round
    FAILURE = 11  # injected client failures (federation.failure_rate), per (round, client)
    PRETRAIN = 12  # a centralized run's self-supervised stage 0 (SSP's rotations, the rotation head), under CENTRAL
    LOCAL_TEST = 13  # each client's local test set drawn from the balanced test set, per client
    PERSONALISE = 14  # a client's personalisation (fine-tuning) before its local evaluation, per client


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """A numpy generator for ``(seed, *stream)``."""
    return np.random.default_rng([seed, *stream])


def torch_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU torch generator for ``(seed, *stream)`` (64 bits drawn from the same seed sequence)."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
