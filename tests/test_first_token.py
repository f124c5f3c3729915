"""The last BERT layer computed for the first token only: the same logits and gradients, for less work."""

from __future__ import annotations

import onnx
import peft
import pytest
import tiny_models
import torch
from conftest import AUSTEN_LABELS
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgepeft import manifest as mf
from edgepeft.export.first_token import first_token_last_layer


@pytest.fixture(scope="module")
def classifier(minilm_dir):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=len(AUSTEN_LABELS))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)  # non-zero, so every LoRA matrix gets a gradient
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich", "short"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))  # padded: the mask matters
    return model.eval(), batch


def _step(model, batch):
    model.zero_grad()
    output = model(**batch, labels=torch.tensor([0, 3, 5]))
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach().clone(), grads


def test_same_logits_and_gradients_and_the_layer_is_restored(classifier):
    model, batch = classifier
    logits, grads = _step(model, batch)
    with first_token_last_layer(model) as applied:
        assert applied
        short_logits, short_grads = _step(model, batch)
    torch.testing.assert_close(short_logits, logits, rtol=0, atol=1e-6)
    assert short_grads.keys() == grads.keys() and len(grads) == 26
    for name, grad in grads.items():
        torch.testing.assert_close(short_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(_step(model, batch)[0], logits, rtol=0, atol=0)  # the class forward is back


def test_other_models_are_left_alone():
    model, _ = tiny_models.mlp()
    with first_token_last_layer(model) as applied:
        assert not applied


def test_exported_last_layer_takes_its_queries_from_the_first_token_only(minilm_int8):
    """In layers 0-4 query and key read the same hidden states; in layer 5 the query reads a slice of them."""
    graph = onnx.load(str(minilm_int8 / mf.INFERENCE_MODEL), load_external_data=False).graph

    def first_input(layer: int, suffix: str) -> str:
        (node,) = [n for n in graph.node if f"layer.{layer}/" in n.name and n.name.endswith(suffix)]
        return node.input[0]

    for layer in range(6):
        query, key = first_input(layer, "self/query/base_layer/MatMul"), first_input(layer, "self/key/MatMul")
        assert (query == key) == (layer < 5), (layer, query, key)
