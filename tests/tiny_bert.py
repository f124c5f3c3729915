"""A tiny randomly initialised BERT classifier directory with a fast tokenizer, made offline in a second."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "the a of and to in is was it that he she his her had with for as not be at by on".split()


def make_tiny_bert(directory: Path, name_or_path: str | None = "edgepeft-tests/tiny-bert") -> Path:
    """Write a 2-layer BERT (hidden 16) and a WordPiece tokenizer to `directory`.

    `name_or_path` is written as config.json's `_name_or_path`, as a model saved from the hub carries it.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = BertTokenizerFast(tokenizer_object=backend, model_max_length=32)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    model = BertModel(config)
    with torch.no_grad():  # distinct values, as a trained model has (the ONNX exporter merges equal tensors)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    if name_or_path is None:
        data.pop("_name_or_path", None)
    else:
        data["_name_or_path"] = name_or_path
    path.write_text(json.dumps(data, indent=2))
    return directory
