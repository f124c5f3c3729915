"""A classifier that reads one token needs only that token from its last encoder layer.

BERT's sequence classifier pools the first ([CLS]) token of the last layer. That layer's queries,
attention output and feed-forward at every other position feed nothing, so computing them for the first
token alone gives the same logits and the same gradients, with about a sixth less work and activation
memory in a training step of the 6-layer MiniLM. The keys and values still cover every token.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def first_token_last_layer(model: nn.Module) -> Iterator[bool]:
    """While exporting, compute the last layer of a BERT classifier for the first token only.

    Yields whether `model` holds such a classifier (anything else is left as it is).
    """
    layer = _last_layer(model)
    if layer is None:
        yield False
        return
    layer.forward = types.MethodType(_first_token_forward, layer)
    logger.info("last encoder layer computed for the first token only")
    try:
        yield True
    finally:
        del layer.forward  # the class's own forward again


def _last_layer(model: nn.Module) -> nn.Module | None:
    """The last `BertLayer` of a `BertForSequenceClassification` with absolute positions, or None."""
    for module in model.modules():
        if type(module).__name__ != "BertForSequenceClassification":
            continue
        config = module.config
        if config.is_decoder or getattr(config, "position_embedding_type", "absolute") != "absolute":
            return None
        return module.bert.encoder.layer[-1]
    return None


def _first_token_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs
) -> tuple[torch.Tensor]:
    """`BertLayer.forward` for the first position: its query attends to every key and value."""
    first = hidden_states[:, :1]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1, :]  # the first query's row
    attention = self.attention
    context = attention.self(first, attention_mask, encoder_hidden_states=hidden_states)[0]
    attended = attention.output(context, first)
    return (self.output(self.intermediate(attended), attended),)
