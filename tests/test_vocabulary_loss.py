"""The next-token loss and its gradient written by hand over vocabulary blocks (export/vocabulary_loss.py) give
the loss and the LoRA gradients ORT's own gradient builder gives for the chunked loss, on the tiny Llama and
GPT-2 configs, with ignored targets and with every target ignored."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny_lm

import edgepeft.export.bundle as export_bundle
from edgepeft import manifest as mf
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.tasks.causal_lm import positions

TARGETS = {"llama": tiny_lm.LLAMA_TARGETS, "gpt2": tiny_lm.GPT2_TARGETS}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """family -> {fused: int8 bundle}: the blockwise loss (the default) and ORT's gradient of the chunked one."""
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        for family in tiny_lm.FAMILIES:
            root = tmp_path_factory.mktemp(family)
            source = tiny_lm.make_dir(family, root / "model")
            made[family] = {}
            for fused in (True, False):
                if not fused:
                    patch.setattr(export_bundle, "fuse_vocabulary_loss_", lambda *args, **kwargs: False)
                out = root / f"fused-{fused}"
                export(source, out, lora=LoraSpec(r=4, target_modules=TARGETS[family]),
                       options=ExportOptions(max_length=32))  # fmt: skip
                made[family][fused] = out
            patch.undo()
    return made


def _step(bundle, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """One forward + backward pass on fixed ids: the loss and every trainable parameter's gradient. The LoRA
    B matrices are set nonzero first, so the A matrices get gradients too."""
    session = TrainingSession(bundle)
    params = session._state.parameters
    rng = np.random.default_rng(1)
    for spec in session.manifest.trainable:
        if "lora_B" in spec.name:
            params[spec.name].data = (0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
    ids = np.random.default_rng(0).integers(0, tiny_lm.VOCAB, labels.shape).astype(np.int64)
    mask = np.ones_like(ids)
    features = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    data = session.dataset({s.name: features[s.name] for s in session.manifest.inputs}, labels)
    session._module.train()
    loss = float(np.asarray(session._module(*session._feeds(data))).reshape(-1)[0])
    return loss, {s.name: np.array(params[s.name].grad) for s in session.manifest.trainable}


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_blockwise_loss_and_gradients_equal_the_generated_ones(bundles, family):
    """Loss within 1e-3 and each LoRA gradient within 1e-4 (relative) of ORT's gradient of the chunked loss, with
    a quarter of the targets ignored; the fused graph has no SoftmaxCrossEntropyLoss left and its logits come in
    vocabulary blocks of every token. (The label's logit is fp32 here and an int8 product's there: the losses
    differ by that rounding, 1e-4 of the loss.)"""
    graph = onnx.load(str(bundles[family][True] / mf.TRAINING_MODEL)).graph
    ops = {n.op_type for n in graph.node}
    assert "SoftmaxCrossEntropyLoss" not in ops and "SoftmaxCrossEntropyLossGrad" not in ops
    int8 = [n.name for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len([n for n in int8 if n.startswith("vocabulary_loss/pass1/")]) >= 2
    labels = np.random.default_rng(2).integers(0, tiny_lm.VOCAB, (3, 32)).astype(np.int64)
    labels[np.random.default_rng(3).random(labels.shape) < 0.25] = -100
    (loss, grads), (expected_loss, expected) = (_step(bundles[family][fused], labels) for fused in (True, False))
    assert loss == pytest.approx(expected_loss, rel=1e-3)
    norms = [np.linalg.norm(g) for g in expected.values()]
    assert min(norms) > 1e-4, "every parameter has a gradient to compare"
    for name, g in expected.items():
        error = np.linalg.norm(grads[name] - g) / np.linalg.norm(g)
        assert error < 1e-4, (name, error)


def test_every_target_ignored_gives_zero_loss_and_gradients(bundles):
    """All targets ignored (a block of prompt tokens alone): loss 0 and gradients 0, not NaN."""
    labels = np.full((2, 32), -100, np.int64)
    loss, grads = _step(bundles["llama"][True], labels)
    assert loss == 0.0
    assert all(np.all(g == 0) for g in grads.values())
