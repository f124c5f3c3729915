"""Task modules: each kind of model that is not a classifier or regressor reads, batches and scores its data in
one place, chosen by the manifest's `task` (schema version 3). The training session stays task-agnostic."""

from __future__ import annotations

from edgepeft.runtime.bundle import Bundle


def task_data(bundle: Bundle):
    """The bundle's task data module (`CausalLMData` for a causal LM), or None for a classifier or regressor."""
    if bundle.manifest.task is None:
        return None
    from edgepeft.runtime.tasks.causal_lm import CausalLMData

    return CausalLMData(bundle)
