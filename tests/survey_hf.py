"""Survey (a script, not a test): which Hugging Face families the exporter compiles today, from tiny random configs.

Each family is built from its transformers config class (hidden 32, 2 layers, 2 heads, vocab 100), fresh
(as initialised from the config: LayerNorms at ones/zeros) and with every parameter perturbed by small noise,
saved with an offline WordLevel tokenizer, exported through `export(model_dir, ...)`, compared with torch's
eval output and trained 20 steps on the device (see survey_layers.py).

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python tests/survey_hf.py [--out survey-hf.md] [names...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import survey_layers  # noqa: E402  (puts tests/ on sys.path)

LABELS = ("a", "b")
VOCAB = 100
TEXTS = ["an example passage", "another one", "the cat sat on the mat", "a dog ran", "hello world"] * 2
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "an example passage another one the cat sat on mat a dog ran hello world".split()
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
NO_TOKEN_TYPES = ["input_ids", "attention_mask"]
WITH_TOKEN_TYPES = ["input_ids", "token_type_ids", "attention_mask"]


def _config(family: str):
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
                           image_size=32, patch_size=8, num_labels=len(LABELS))  # fmt: skip
    if family == "resnet":
        return t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                              num_labels=len(LABELS))  # fmt: skip
    raise KeyError(family)


# family -> (LoRA targets, the inputs its real fast tokenizer emits)
TEXT_FAMILIES = {
    "bert": (("query", "value"), WITH_TOKEN_TYPES),
    "distilbert": (("q_lin", "v_lin"), NO_TOKEN_TYPES),
    "roberta": (("query", "value"), NO_TOKEN_TYPES),
    "xlm-roberta": (("query", "value"), NO_TOKEN_TYPES),
    "albert": (("query", "value"), WITH_TOKEN_TYPES),
    "electra": (("query", "value"), WITH_TOKEN_TYPES),
    "deberta-v2": (("query_proj", "value_proj"), WITH_TOKEN_TYPES),
    "mobilebert": (("query", "value"), WITH_TOKEN_TYPES),
}
VISION_FAMILIES = {"vit": ("query", "value"), "resnet": ("convolution",)}


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


def make_text_dir(family: str, perturbed: bool, directory: Path, input_names: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_config(family))
    if perturbed:
        perturb_(model)
    model.save_pretrained(directory)
    tokenizer(input_names).save_pretrained(directory)


def make_vision_dir(family: str, perturbed: bool, directory: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ConvNextImageProcessor
    from transformers import ViTImageProcessor

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(_config(family))
    if perturbed:
        perturb_(model)
    model.save_pretrained(directory)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}) if family == "vit" else ConvNextImageProcessor(
        size={"shortest_edge": 32}
    )
    processor.save_pretrained(directory)
    assert AutoImageProcessor.from_pretrained(directory) is not None


def _reference(directory: Path, features: dict[str, np.ndarray], vision: bool) -> np.ndarray:
    """torch's eval logits, the head initialised as the exporter does (options.seed 0, before loading)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if vision else AutoModelForSequenceClassification
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_pretrained(
            directory, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)}, ignore_mismatched_sizes=vision,
        )  # fmt: skip
    with torch.no_grad():
        return model.eval()(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()


def _hf_case(
    family: str, perturbed: bool, quantization: str, input_names: list[str] | None
) -> Callable[[Path], tuple[dict[str, np.ndarray], np.ndarray, int]]:
    from edgepeft.export import ExportOptions, LoraSpec, export
    from edgepeft.runtime import TrainingSession

    vision = family in VISION_FAMILIES
    targets = VISION_FAMILIES[family] if vision else TEXT_FAMILIES[family][0]

    def go(bundle: Path) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / family
            if vision:
                make_vision_dir(family, perturbed, directory)
            else:
                make_text_dir(family, perturbed, directory, input_names or TEXT_FAMILIES[family][1])
            options = ExportOptions(labels=LABELS, quantization=quantization, max_length=16)
            export(directory, bundle, lora=LoraSpec(target_modules=targets), options=options)
            session = TrainingSession(bundle)
            if session.bundle.has_tokenizer:
                features = session.encode(TEXTS)
            else:
                rng = np.random.default_rng(0)
                features = {s.name: rng.standard_normal((len(TEXTS), *s.shape[1:])).astype(np.float32)
                            for s in session.manifest.inputs}  # fmt: skip
            return features, _reference(directory, features, vision), len(LABELS)

    return go


def cases(names: list[str]) -> list[tuple[str, str, bool, list[str] | None]]:
    """(row name, family, perturbed, tokenizer input names or None for the family's own)."""
    out = []
    for family in names:
        for perturbed in (False, True):
            out.append((f"{family} ({'perturbed' if perturbed else 'fresh'})", family, perturbed, None))
    for family in ("distilbert", "roberta"):  # a tokenizer that emits token_type_ids the model does not take
        if family in names:
            out.append((f"{family} (perturbed, tokenizer emits token_type_ids)", family, True, WITH_TOKEN_TYPES))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="families (default: all)")
    parser.add_argument("--out", default="survey-hf.md")
    parser.add_argument("--quantization", nargs="+", default=["int8", "fp32"])
    args = parser.parse_args()
    survey_layers.quiet()
    names = args.names or [*TEXT_FAMILIES, *VISION_FAMILIES]
    results = [
        survey_layers.run_case(row, q, _hf_case(family, perturbed, q, inputs))
        for row, family, perturbed, inputs in cases(names)
        for q in args.quantization
    ]
    title = "Survey: Hugging Face families (tiny random configs) through `edgepeft.export.export(model_dir, ...)`"
    Path(args.out).write_text(survey_layers.table(results, title, key_header="family (weights)"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
