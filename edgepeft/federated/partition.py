"""Non-IID splits of a labelled data set: a Dirichlet(alpha) share of every class per client."""

from __future__ import annotations

import numpy as np

from edgepeft.errors import InputError


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Split example indices into `clients` parts; each class is spread over clients by Dirichlet(alpha) shares.

    A small alpha (0.3) gives each client mostly one or two classes. Every client gets at least one example
    (examples are moved from the largest parts when needed), so `clients` may not exceed the examples. The
    split depends only on the labels, `clients`, `alpha` and `seed`: every process computes the same one.
    """
    labels = np.asarray(labels)
    if clients < 1 or clients > len(labels):
        raise InputError(f"cannot split {len(labels)} examples over {clients} clients")
    if alpha <= 0:
        raise InputError(f"the Dirichlet alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for value in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == value))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(index)).astype(int)
        for part, chunk in zip(parts, np.split(index, cuts)):
            part.extend(chunk.tolist())
    for part in parts:  # no empty client: take one example from the largest part
        if not part:
            largest = max(parts, key=len)
            part.append(largest.pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
