"""Device generation on tiny Llama and GPT-2 int8 bundles (issue 12): the weights dequantized once at load give the
numbers per-run dequantization gives, the KV cache gives the whole prefix's argmax, the adapter is applied, and
greedy tokens equal transformers + PEFT's on the bundle's own int8-dequantized frozen weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_lm
import torch

from edgepeft import manifest as mf
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.export.quantize import BLOCK_SIZE, blockable, dequantized, quantize_blocks
from edgepeft.runtime.adapter import save_adapter
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.dequantized import dequantized_graph
from edgepeft.runtime.generation import Generator
from edgepeft.runtime.tasks import task_data

TARGETS = {"llama": tiny_lm.LLAMA_TARGETS, "gpt2": tiny_lm.GPT2_TARGETS}
PROMPTS = ("the cat sat", "hello world she said", "what is your name i am")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (model dir, int8 bundle)."""
    made = {}
    for family in tiny_lm.FAMILIES:
        root = tmp_path_factory.mktemp(family)
        source = tiny_lm.make_dir(family, root / "model")
        export(source, root / "int8", lora=LoraSpec(r=4, target_modules=TARGETS[family]),
               options=ExportOptions(max_length=32))  # fmt: skip
        made[family] = (source, root / "int8")
    return made


def _adapter(bundle, seed: int = 0, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: (rng.standard_normal(s.shape) * scale).astype(np.float32) for s in bundle.manifest.trainable}


def _generator(path: Path, dequantize_once: bool = True) -> tuple[Generator, object]:
    bundle = open_bundle(path)
    return Generator(bundle, task_data(bundle), dequantize_once=dequantize_once), bundle


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_weights_dequantized_once_are_dequantize_linear_exactly(bundles, family):
    """The graph handed to ORT has no DequantizeLinear of a weight left (nor the Reshape of a blocked one), and
    each fp32 weight is q * scale, per block where its rows divide into blocks."""
    path = bundles[family][1] / mf.GENERATION_MODEL
    original = onnx.load(str(path))
    dequantizers = [n for n in original.graph.node if n.op_type == "DequantizeLinear"]
    dequantized_names = {n.output[0] for n in dequantizers}
    reshapes = {n.input[0]: n.output[0] for n in original.graph.node
                if n.op_type == "Reshape" and n.input[0] in dequantized_names}  # fmt: skip
    data, weights = dequantized_graph(path)
    left = onnx.load_from_string(data)
    assert dequantizers and not [n for n in left.graph.node if n.op_type == "DequantizeLinear"]
    assert set(weights) == {reshapes.get(n.output[0], n.output[0]) for n in dequantizers}
    assert not set(reshapes.values()) & {o for n in left.graph.node for o in n.output}
    # no Transpose of a blocked weight (ORT would keep a transposed fp32 copy): matmuls read it with transB
    assert not [n for n in original.graph.node if n.op_type == "Transpose" and n.input[0] in reshapes.values()]
    held = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    blocked = [n for n in dequantizers if n.output[0] in reshapes]
    assert blocked and len(blocked) < len(dequantizers)  # tiny rows of 32 stay per channel, of 64+ get blocks
    for node in (blocked[0], next(n for n in dequantizers if n not in blocked)):
        expected = held[node.input[0]].astype(np.float32) * held[node.input[1]][:, None]
        weight = reshapes.get(node.output[0], node.output[0])
        np.testing.assert_array_equal(weights[weight], expected.reshape(weights[weight].shape))
    placeholders = [i for i in left.graph.initializer if i.name in weights]  # handed over in memory, not serialized
    assert len(placeholders) == len(weights) and not any(i.raw_data or i.float_data for i in placeholders)


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_generation_weights_have_a_scale_per_block(bundles, family):
    """Every frozen weight whose rows divide into blocks of BLOCK_SIZE is stored with a scale per block: its
    dequantized value is the source's blockwise rounding, closer to the source than per-channel rounding."""
    from transformers import AutoModelForCausalLM

    source, path = bundles[family]
    _, held = dequantized_graph(path / mf.GENERATION_MODEL)
    weights = {name.replace(".base_layer.", "."): value for name, value in held.items()}  # LoRA's wrapped layers
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    checked = 0
    for name, param in model.named_parameters():
        w = param.detach().numpy()
        if name not in weights or not blockable(w, BLOCK_SIZE):
            continue
        np.testing.assert_array_equal(weights[name], dequantized(w, BLOCK_SIZE))
        per_channel = dequantized(w)
        assert np.abs(weights[name] - w).mean() < np.abs(per_channel - w).mean()
        checked += 1
    assert checked >= 1


def test_blocks_keep_block_scaled_int8_exact():
    """GGUF's Q8_0 (int8 blocks of 32, a scale each, the largest at +-127) survives block quantization exactly;
    per-channel quantization of the same weight does not."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (8, 4, BLOCK_SIZE)).astype(np.float32)
    q[..., 0] = 127
    weight = (q * rng.uniform(1e-3, 1e-1, (8, 4, 1)).astype(np.float32)).reshape(8, 4 * BLOCK_SIZE)
    blocks, scale = quantize_blocks(weight, BLOCK_SIZE)
    assert blocks.shape == (32, BLOCK_SIZE) and scale.shape == (32,)
    np.testing.assert_allclose(dequantized(weight, BLOCK_SIZE), weight, rtol=1e-6, atol=0)
    assert np.abs(dequantized(weight) - weight).max() > 1e-3


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_dequantized_once_generates_as_per_run_dequantization(bundles, family):
    """Same greedy tokens as the int8-resident session (which runs DequantizeLinear every run), logits to 1e-5."""
    fast, bundle = _generator(bundles[family][1])
    slow, _ = _generator(bundles[family][1], dequantize_once=False)
    values = _adapter(bundle)
    for prompt in PROMPTS:
        assert fast.generate(prompt, values, 12).token_ids == slow.generate(prompt, values, 12).token_ids
    ids = fast._prompt_ids(PROMPTS[0])
    logits = [g._run(g._binding(values), ids, 0, first=True) for g in (fast, slow)]
    assert logits[0].shape == (tiny_lm.VOCAB,)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_cached_tokens_are_the_whole_prefix_argmax(bundles, family):
    """Each cached step's token is the argmax of a cache-free run over the whole sequence so far."""
    generator, bundle = _generator(bundles[family][1])
    values = _adapter(bundle)
    cached = generator.generate("the cat sat", values, 10, stop_ids=())
    sequence = generator._prompt_ids("the cat sat")
    for token in cached.token_ids:
        logits = generator._run(generator._binding(values), sequence, 0, first=True)
        assert int(np.argmax(logits)) == token
        sequence.append(token)
    assert generator.generate("the cat sat", values, 10, stop_ids=(), use_cache=False).token_ids == cached.token_ids


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_teacher_forced_picks_are_each_forced_prefix_argmax(bundles, family):
    """Forcing in another continuation: each pick is the argmax of a cache-free run over the prompt and the forced
    tokens before it; forcing in the device's own greedy tokens gives them back."""
    generator, bundle = _generator(bundles[family][1])
    values = _adapter(bundle)
    own = generator.generate("the cat sat", values, 8, stop_ids=()).token_ids
    assert generator.teacher_forced("the cat sat", own, values) == own
    forced = [int(t) for t in np.random.default_rng(1).integers(0, tiny_lm.VOCAB, 8)]
    picks = generator.teacher_forced("the cat sat", forced, values)
    sequence = generator._prompt_ids("the cat sat")
    for pick, token in zip(picks, forced):
        assert pick == int(np.argmax(generator._run(generator._binding(values), sequence, 0, first=True)))
        sequence.append(token)
    assert picks != own  # the forced tokens, not the device's own, were read


def test_generation_graph_computes_the_last_positions_logits_only(bundles):
    model = onnx.load(str(bundles["llama"][1] / mf.GENERATION_MODEL), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1


def test_generation_follows_the_adapter_it_is_given(bundles):
    """One generator, adapters swapped between calls: each call uses its own (none is cached in the binding)."""
    generator, bundle = _generator(bundles["llama"][1])
    zero = {k: v * 0 for k, v in _adapter(bundle).items()}
    first, second = _adapter(bundle, seed=1, scale=1.0), _adapter(bundle, seed=2, scale=1.0)
    tokens = [generator.generate("hello", zero, 12, stop_ids=()).token_ids]
    tokens += [generator.generate("hello", v, 12, stop_ids=()).token_ids for v in (first, second, zero, first)]
    assert tokens[0] != tokens[1] != tokens[2]
    assert tokens[3] == tokens[0] and tokens[4] == tokens[1]


def _int8_host(source: Path, adapter: Path):
    """transformers + PEFT with each frozen weight replaced by its int8-dequantized value (the generation graph's:
    a scale per block where the rows divide into blocks)."""
    import peft
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
                module.weight.copy_(torch.from_numpy(dequantized(module.weight.numpy(), BLOCK_SIZE)))
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_greedy_tokens_equal_peft_on_the_int8_weights(bundles, family, tmp_path):
    """The stated tolerance, on tiny models: all 16 greedy tokens of every prompt equal transformers' `generate`
    (KV cache) with the PEFT adapter on the same int8-dequantized frozen weights (SmolLM2's figures:
    benchmarks/lm_generate.py)."""
    source, path = bundles[family]
    generator, bundle = _generator(path)
    values = _adapter(bundle)
    host = _int8_host(source, save_adapter(bundle.manifest, values, tmp_path / "adapter"))
    for prompt in PROMPTS:
        ids = torch.tensor([generator._prompt_ids(prompt)])
        with torch.no_grad():
            expected = host.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                     min_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
        assert generator.generate(prompt, values, 16, stop_ids=()).token_ids == expected[0, ids.shape[1] :].tolist()


def test_last_position_slice_leaves_a_graph_it_cannot_slice_alone():
    """A `logits` not made by a matmul is left as it is (every position's), and says so by returning False."""
    from onnx import TensorProto, helper

    from edgepeft.export.generation_graph import last_position_logits_

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [y]))
    before = model.SerializeToString()
    assert last_position_logits_(model) is False and model.SerializeToString() == before
