"""A causal LM's training memory (issue 12): block recomputation, the lm_head gradient in row blocks, and
memory budgets, on the tiny Llama and GPT-2 configs. SmolLM2 itself: benchmarks/lm_train_memory.py."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import pytest
import tiny_lm
from onnx import helper, numpy_helper

from edgepeft import manifest as mf
from edgepeft.errors import InputError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.export.int8_compute import chunked_dequantized_matmul
from edgepeft.export.quantize import quantize_per_channel
from edgepeft.export.recompute import BLOCK, SUFFIX, _static_tensors
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.ort import onnxruntime_module

TARGETS = {"llama": tiny_lm.LLAMA_TARGETS, "gpt2": tiny_lm.GPT2_TARGETS}
DATA = ["input_ids", "attention_mask", "position_ids", "labels"]
TEXT = "the cat sat on a mat . she said hello world to the dog and he was very happy to see her again . " * 8


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """family -> {recompute: int8 bundle}, recompute True being the causal LM default."""
    made = {}
    for family in tiny_lm.FAMILIES:
        root = tmp_path_factory.mktemp(family)
        source = tiny_lm.make_dir(family, root / "model")
        made[family] = {}
        for recompute in (None, False):
            out = root / f"recompute-{recompute}"
            export(source, out, lora=LoraSpec(r=4, target_modules=TARGETS[family]),
                   options=ExportOptions(max_length=32, recompute=recompute))  # fmt: skip
            made[family][recompute is None] = out
    return made


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "novel.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _split(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    # independent of recompute.split_passes: the backward is what ORT's gradient builder named so, and what
    # descends from the loss gradient
    reached, forward, backward = {"loss_grad"}, [], []
    for node in graph.node:
        if "_Grad/" in node.name or reached.intersection(node.input) or node.name.endswith(SUFFIX):
            reached.update(node.output)
            backward.append(node)
        else:
            forward.append(node)
    return forward, backward


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_backward_reads_no_block_activation_of_the_forward_pass(bundles, family):
    """With recomputation (the LM default) the backward reads no tensor a block computed from an activation in
    the forward pass; without it, it reads many. Every copy runs after the backward has begun (it descends from
    the loss gradient), else ORT could compute it early and keep it."""
    layers = 2
    for recompute, bundle in bundles[family].items():
        graph = onnx.load(str(bundle / mf.TRAINING_MODEL)).graph
        forward, backward = _split(graph)
        static = _static_tensors(graph, forward, set(DATA))
        block_of = {o: BLOCK.search(n.name).group(1) for n in forward if BLOCK.search(n.name) for o in n.output}
        # what a block passes on to the next (its output, shared rotary tables) is the checkpoint: kept
        passed = {i for n in forward for i in n.input
                  if i in block_of and (BLOCK.search(n.name) or [None, None])[1] != block_of[i]}  # fmt: skip
        # (a gradient's Shape of a forward tensor reads its shape alone, and runs as soon as the tensor exists)
        read = {i for n in backward if n.op_type != "Shape" for i in n.input} & (set(block_of) - static - passed)
        if not recompute:
            assert len(read) > 5 * layers
            continue
        assert not read, sorted(read)[:5]
        copies = [n for n in backward if n.name.endswith(SUFFIX)]
        blocks = {BLOCK.search(n.name).group(1) for n in copies}
        assert blocks == {str(i) for i in range(layers)}
        producer = {o: n for n in graph.node for o in n.output}

        def after_backward(name: str, seen: set) -> bool:
            if name == "loss_grad":
                return True
            node = producer.get(name)
            if node is None or id(node) in seen:
                return False
            seen.add(id(node))
            return any(after_backward(i, seen) for i in node.input)

        assert all(after_backward(n.output[0], set()) for n in copies)


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_recomputed_gradients_equal_the_kept_ones(bundles, family, text_file):
    """One step's loss and every LoRA gradient are the same with and without recomputation."""
    results = []
    for recompute in (True, False):
        session = TrainingSession(bundles[family][recompute])
        data = session.load_data(text_file)
        session._module.train()
        loss = float(np.asarray(session._module(*session._feeds(data))).reshape(-1)[0])
        params = session._state.parameters
        grads = {s.name: np.array(params[s.name].grad) for s in session.manifest.trainable}
        results.append((loss, grads))
    (loss, grads), (kept_loss, kept) = results
    assert loss == pytest.approx(kept_loss, abs=1e-6)
    assert any(np.abs(g).max() > 1e-4 for g in kept.values())
    for name, g in kept.items():
        np.testing.assert_allclose(grads[name], g, atol=1e-6, rtol=1e-5, err_msg=name)


def _step_tensor_shapes(bundle, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every tensor one training step computes, by name, with its shape: the training graph run as an
    inference graph with all node outputs exposed, on the checkpoint's parameters."""
    ort = onnxruntime_module()
    from edgepeft.runtime.ort import training_api

    model = onnx.load(str(bundle / mf.TRAINING_MODEL))
    names = list(dict.fromkeys(o for n in model.graph.node for o in n.output if o))
    exposed = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in names if o not in exposed)
    params = training_api().CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT)).parameters
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    suffix = "_grad.accumulation.buffer"
    for value in session.get_inputs():
        if value.name == "lazy_reset_grad":
            feeds[value.name] = np.array([True])
        elif value.name.endswith(suffix):
            feeds[value.name] = np.zeros_like(params[value.name[: -len(suffix)]].data)
        elif value.name not in feeds:
            feeds[value.name] = params[value.name].data
    outputs = [o.name for o in session.get_outputs()]
    return {n: v.shape for n, v in zip(outputs, session.run(outputs, feeds))}


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_no_tensor_of_a_step_holds_the_whole_blocks_logits(bundles, family):
    """The next-token loss runs over blocks of the vocabulary (export/vocabulary_loss.py): at 4 x 32 tokens no
    tensor of the step has the (tokens, vocabulary) logits' shape or their gradient's; each block's logits are
    every token's over part of the vocabulary, computed once in each pass."""
    batch, length = 4, 32
    ids = np.random.default_rng(0).integers(0, tiny_lm.VOCAB, (batch, length)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}  # fmt: skip
    shapes = {n: shape for n, shape in _step_tensor_shapes(bundles[family][True], feeds).items()
              if not BLOCK.search(n)}  # the tiny configs' MLPs are as wide as the vocabulary  # fmt: skip
    whole = {(batch * length, tiny_lm.VOCAB), (batch, length, tiny_lm.VOCAB)}
    assert not [n for n, shape in shapes.items() if tuple(shape) in whole]
    block_logits = [n for n, shape in shapes.items() if n.endswith("/logits")]
    assert len(block_logits) == 2 * 2, block_logits  # 2 blocks, 2 passes
    assert all(shapes[n][0] == batch * length and shapes[n][1] <= tiny_lm.VOCAB // 2 for n in block_logits)


def test_recompute_can_be_turned_off_and_is_checked():
    assert ExportOptions().recompute_blocks(causal_lm=True) and not ExportOptions().recompute_blocks(causal_lm=False)
    assert not ExportOptions(recompute=False).recompute_blocks(causal_lm=True)
    with pytest.raises(Exception, match="recompute"):
        ExportOptions(recompute="yes")


def test_cli_export_switches_recompute(tmp_path):
    """`edgepeft export --no-recompute` writes a causal LM's training graph without the blocks' copies;
    `--recompute` and the default write them."""
    from click.testing import CliRunner

    from edgepeft.cli import main

    source = tiny_lm.make_dir("gpt2", tmp_path / "model")

    def copies(flag: str) -> int:
        out = tmp_path / f"b{flag}"
        result = CliRunner().invoke(main, ["export", str(source), "--out", str(out), "--target-modules", "c_attn",
                                           "--max-length", "16", *([flag] if flag else [])])  # fmt: skip
        assert result.exit_code == 0, result.output
        graph = onnx.load(out / mf.TRAINING_MODEL, load_external_data=False).graph
        return sum(n.name.endswith(SUFFIX) for n in graph.node)

    assert copies("") > 0 and copies("--recompute") > 0
    assert copies("--no-recompute") == 0


def test_chunked_lm_head_gradient_equals_the_plain_product():
    """`gradient @ DQ(W)` in row blocks (a tied lm_head's input gradient) equals the one fp32 product within
    1e-5, and no DequantizeLinear in it dequantizes more than a block of rows."""
    rng = np.random.default_rng(0)
    rows, width, tokens, chunk = 100, 24, 7, 32
    q, scale = quantize_per_channel(rng.standard_normal((rows, width)).astype(np.float32))
    zero = np.zeros(rows, np.int8)
    gradient = rng.standard_normal((2, tokens, rows)).astype(np.float32)
    dq = ["w.int8", "w.scale", "w.zero_point"]
    nodes = chunked_dequantized_matmul("g", "gradient", dq, "out", rows, chunk=chunk)
    inits = [numpy_helper.from_array(a, n) for a, n in ((q, dq[0]), (scale, dq[1]), (zero, dq[2]))]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n)
              for v, n in ((-1, "row_int8/last_axis"), (0, "row_int8/first_axis"), (1, "int8/one_end"))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "chunked", [helper.make_tensor_value_info("gradient", onnx.TensorProto.FLOAT, [2, tokens, rows])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ort = onnxruntime_module()
    (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"gradient": gradient}
    )
    expected = gradient @ (q.astype(np.float32) * scale[:, None])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    dequantizes = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert len(dequantizes) == -(-rows // chunk) and all(n.input[0].startswith("g/chunk") for n in dequantizes)
    # each block waits for the one before (the first for the gradient): ORT cannot dequantize them all at once
    producer = {o: n for n in nodes for o in n.output}

    def ancestors(name: str) -> set[str]:
        seen, stack = set(), [name]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen | {i for n in nodes if n.name in seen for i in n.input}

    for i, dq in enumerate(dequantizes):
        assert ("gradient" if i == 0 else f"g/chunk{i - 1}/product") in ancestors(dq.output[0])


def test_memory_budget_works_for_a_causal_lm(tmp_path, text_file):
    """A causal LM bundle exported with a memory profile trains within a budget that fits and refuses one
    that does not, naming the estimate."""
    source = tiny_lm.make_dir("llama", tmp_path / "model")
    out = tmp_path / "bundle"
    manifest = export(source, out, lora=LoraSpec(r=2, target_modules=("q_proj", "v_proj")),
                      options=ExportOptions(max_length=32, profile_memory=True))  # fmt: skip
    profile = manifest.stats["memory_profile"]
    assert profile["base_mb"] > 0 and len(profile["points"]) == 3
    session = TrainingSession(out)
    data = session.load_data(text_file)
    report = session.train(data, TrainConfig(batch_size=2, max_steps=1, memory_budget_mb=profile["base_mb"] * 3))
    assert report.steps == 1
    with pytest.raises(InputError, match="estimated peak memory"):
        session.train(data, TrainConfig(batch_size=2, max_steps=1, memory_budget_mb=1.0))


def test_lm_head_gradient_of_a_large_vocabulary_is_chunked(tmp_path):
    """A vocabulary over the chunk size (a GPT-2 config with 9,000 tokens) gets its lm_head input gradient in
    row blocks: no DequantizeLinear in the training graph reads the whole tied embedding, each reads a block."""
    import transformers as t
    from transformers import AutoModelForCausalLM

    config = t.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_inner=32, vocab_size=9000, n_positions=64,
                          tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    source = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_lm.tokenizer("gpt2").save_pretrained(source)
    out = tmp_path / "bundle"
    export(source, out, lora=LoraSpec(r=2, target_modules=("c_attn",)), options=ExportOptions(max_length=16))
    graph = onnx.load(str(out / mf.TRAINING_MODEL)).graph
    dq_reads = defaultdict(list)
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            dq_reads[n.input[0]].append(n.name)
    assert not [r for r in dq_reads if r.startswith("transformer.wte.weight")], dq_reads.keys()
    blocks = [r for r in dq_reads if r.startswith("vocabulary_loss/pass2/block")]
    assert len(blocks) >= 2, dq_reads.keys()
