"""Tiny Hugging Face classifier directories, one per family, made offline in a second.

Each is built from its transformers config class (hidden 32, 2 layers, 2 heads, vocab 100): `fresh` as
initialised from the config (every LayerNorm weight ones, biases zeros) or perturbed by small noise (a
trained model's state: no two tensors equal). Text families get a WordLevel tokenizer that emits what the
family's real tokenizer emits (or `input_names`); image families an image processor of 32 x 32 images.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 100
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "an example passage another one the cat sat on mat a dog ran hello world".split()
TEXTS = ["an example passage", "another one", "the cat sat on the mat", "a dog ran", "hello world", "the mat"]
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
NO_TOKEN_TYPES = ["input_ids", "attention_mask"]
WITH_TOKEN_TYPES = ["input_ids", "token_type_ids", "attention_mask"]
IMAGE_SIZE = 32
# family -> the inputs its real fast tokenizer emits
TEXT_FAMILIES = {
    "bert": WITH_TOKEN_TYPES,
    "distilbert": NO_TOKEN_TYPES,
    "roberta": NO_TOKEN_TYPES,
    "xlm-roberta": NO_TOKEN_TYPES,
    "albert": WITH_TOKEN_TYPES,
    "electra": WITH_TOKEN_TYPES,
    "deberta-v2": WITH_TOKEN_TYPES,
    "mobilebert": WITH_TOKEN_TYPES,
}
IMAGE_FAMILIES = ("vit", "resnet")


def config(family: str, num_labels: int = 2):
    """The family's tiny transformers config."""
    import transformers as t

    if family == "bert":
        return t.BertConfig(**COMMON)
    if family == "distilbert":
        return t.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                  max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    if family == "roberta":
        return t.RobertaConfig(**COMMON, bos_token_id=2, eos_token_id=3)
    if family == "xlm-roberta":
        return t.XLMRobertaConfig(**COMMON, bos_token_id=2, eos_token_id=3)
    if family == "albert":
        return t.AlbertConfig(**COMMON, embedding_size=16)
    if family == "electra":
        return t.ElectraConfig(**COMMON, embedding_size=16)
    if family == "deberta-v2":
        return t.DebertaV2Config(**COMMON)
    if family == "mobilebert":
        return t.MobileBertConfig(**COMMON, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16)
    if family == "vit":
        return t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=IMAGE_SIZE, patch_size=8, num_labels=num_labels)  # fmt: skip
    if family == "resnet":
        return t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                              num_labels=num_labels)  # fmt: skip
    raise KeyError(family)


def tokenizer(model_input_names: list[str]):
    """A WordLevel tokenizer of VOCAB entries, built offline, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=model_input_names,
    )  # fmt: skip


def perturb_(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Add small noise to every parameter, so no two tensors hold equal values (a trained model's state)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def make_dir(family: str, directory: Path, perturbed: bool, input_names: list[str] | None = None,
             num_labels: int = 2) -> Path:  # fmt: skip
    """Write the family's tiny classifier (a backbone with a head of `num_labels`) and its preprocessor."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if family in IMAGE_FAMILIES:
        model = AutoModelForImageClassification.from_config(config(family, num_labels))
    else:
        model = AutoModelForSequenceClassification.from_config(config(family))
    if perturbed:
        perturb_(model)
    model.save_pretrained(directory)
    if family == "vit":
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    elif family == "resnet":  # microsoft/resnet-50's processor, at 32: resize the short side to 36, crop 32
        from transformers import ConvNextImageProcessor

        ConvNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_pct=0.875).save_pretrained(directory)
    else:
        tokenizer(input_names or TEXT_FAMILIES[family]).save_pretrained(directory)
    return directory
