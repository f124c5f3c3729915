"""Causal language models end to end on tiny Llama and GPT-2 configs: export, device data, loss, perplexity,
KV-cache generation, PEFT adapters both ways (issue 12). Host references come from transformers + PEFT."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_lm
import torch

from edgepeft import manifest as mf
from edgepeft.errors import BundleError, DataError, InputError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import GenerationSession, TrainConfig, TrainingSession
from edgepeft.runtime.tasks.causal_lm import IGNORE

TEXT = "the cat sat on a mat . she said hello world to the dog and he was very happy to see her again . " * 12
CHAT = [
    {"role": "system", "content": "good day"},
    {"role": "user", "content": "what is your name"},
    {"role": "assistant", "content": "i am fine thank you"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "good day to you"},
]
TARGETS = {"llama": tiny_lm.LLAMA_TARGETS, "gpt2": tiny_lm.GPT2_TARGETS}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """family -> (model dir, int8 bundle, fp32 bundle), exported once."""
    made = {}
    for family in tiny_lm.FAMILIES:
        root = tmp_path_factory.mktemp(family)
        source = tiny_lm.make_dir(family, root / "model")
        bundles = []
        for quantization in ("int8", "fp32"):
            out = root / quantization
            export(source, out, lora=LoraSpec(r=4, target_modules=TARGETS[family]),
                   options=ExportOptions(max_length=32, quantization=quantization))  # fmt: skip
            bundles.append(out)
        made[family] = (source, *bundles)
    return made


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "novel.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _host_model(source: Path, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _host_loss(model, data) -> tuple[float, int]:
    """transformers' own shifted, -100-ignoring loss on the device's batch, and its token count."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(data.features["input_ids"]),
                    attention_mask=torch.from_numpy(data.features["attention_mask"]),
                    labels=torch.from_numpy(data.labels))  # fmt: skip
    return float(out.loss), int((data.labels[:, 1:] != IGNORE).sum())


def _random_adapter(session: TrainingSession, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal(v.shape) * scale).astype(np.float32)
            for name, v in session.trainable_values().items()}  # fmt: skip


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_manifest_records_the_lm_task(lm, family):
    manifest = mf.Manifest.load(lm[family][1])
    assert manifest.schema_version == 3 and manifest.loss == "next_token" and not manifest.is_classifier
    task = manifest.task
    assert (task.bos_token_id, task.eos_token_id, task.pad_token_id, task.max_length) == (2, 3, 0, 32)
    assert task.stop_token_ids == (3, 5)  # eos and the chat template's end of turn, <|im_end|>
    assert task.chat_template == tiny_lm.CHAT_TEMPLATE and mf.GENERATION_MODEL in manifest.files
    assert manifest.label == mf.TensorSpec("labels", "int64", ("batch_size", "sequence_length"))
    assert mf.Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    with pytest.raises(BundleError, match="schema version 2 has no `task`"):
        mf.Manifest.from_dict({**json.loads(manifest.to_json()), "schema_version": 2})


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_backbone_is_int8_with_one_copy_of_the_tied_embedding(lm, family):
    """Every frozen matrix (GPT-2's Conv1D too) is int8; the tied lm_head reads the embedding's one int8 copy; only
    the lm_head's gradient dequantizes (its rows, for its fp32 product)."""
    bundle = lm[family][1]
    vocab, hidden = tiny_lm.VOCAB, 32
    for name in (mf.TRAINING_MODEL, mf.GENERATION_MODEL):  # training: the frozen tensors are graph inputs
        graph = onnx.load(str(bundle / name)).graph
        tensors = [(i.name, i.data_type, list(i.dims)) for i in graph.initializer]
        tensors += [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
                    for v in graph.input]  # fmt: skip
        fp32_matrices = [n for n, t, dims in tensors if t == onnx.TensorProto.FLOAT and len(dims) == 2 and "lora_" not in n]
        assert fp32_matrices == [], (name, fp32_matrices)
        tables = [n for n, t, dims in tensors if dims == [vocab, hidden] and any(k in n for k in ("embed", "wte", "lm_head"))]
        assert len(tables) == 1 and tables[0].endswith(".int8") and "lm_head" not in tables[0], tables
    stats = mf.Manifest.load(bundle).stats
    assert stats["quantized_weights"] == {"llama": 2 * 7 + 1, "gpt2": 2 * 4 + 2}[family]
    if family == "llama":  # every Linear's forward multiplies int8 weights; each backward one dequantizes its own
        graph = onnx.load(str(bundle / mf.TRAINING_MODEL)).graph
        users = {o: [n for n in graph.node if o in n.input] for d in graph.node if d.op_type == "DequantizeLinear"
                 for o in d.output}  # fmt: skip
        backward = ("_Grad", "vocabulary_loss/pass2/")  # ORT's gradient, and the loss's own (test_vocabulary_loss.py)
        assert users and all(len(u) == 1 and u[0].op_type == "MatMul" and any(b in u[0].name for b in backward)
                             for u in users.values())  # fmt: skip
        int8 = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"  # each token's row its own scale
                and not n.name.endswith("/recompute")]  # the block's copy for the backward (test_lm_memory.py)
        head = [n for n in int8 if n.name.startswith("vocabulary_loss/")]  # two passes over 2 vocabulary blocks
        assert len(head) == 2 * 2 and all(n.input[0] == "vocabulary_loss/u7" for n in head)
        forward = [n for n in int8 if "_Grad" not in n.name and n not in head]
        assert len(forward) == 2 * 7 and all(n.input[0].endswith("/row_int8/u7") for n in forward)
        # the input gradients (none into layer 0's q, k, v: nothing before them trains) are int8 too
        assert len(int8) - len(forward) - len(head) == 2 * 7 - 3


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_training_and_evaluation_output_the_loss_alone(lm, family):
    """The vocabulary-wide logits are no output of the training or the evaluation graph (the loss is computed in
    row chunks: tests/test_lm_memory.py), and no tensor is named for them."""
    for bundle in lm[family][1:]:
        for name in (mf.TRAINING_MODEL, mf.EVAL_MODEL):
            graph = onnx.load(str(bundle / name)).graph
            assert [o.name for o in graph.output if not o.name.endswith(".accumulation.out")] == ["loss"], name
            assert not [n.name for n in graph.node if "logits" in n.input or "logits" in n.output]


def test_generation_graph_is_the_only_inference_graph(lm):
    """A causal LM bundle has no inference.onnx: generation.onnx with an empty past is the model's forward pass."""
    bundle = lm["llama"][1]
    assert mf.INFERENCE_MODEL not in mf.Manifest.load(bundle).files and not (bundle / mf.INFERENCE_MODEL).exists()
    assert mf.GENERATION_MODEL in mf.Manifest.load(bundle).files


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_attention_softmax_has_no_nan_guard(lm, family):
    """PyTorch's SDPA export guards each softmax with Where(IsNaN); with finite masks it is gone from training and
    evaluation (`export/attention_mask.py`); the loss still equals transformers' (the shifted-loss test)."""
    for graph in (mf.TRAINING_MODEL, mf.EVAL_MODEL):
        nodes = onnx.load(str(lm[family][1] / graph), load_external_data=False).graph.node
        assert any(n.op_type == "Softmax" for n in nodes)
        assert not [n.name for n in nodes if n.op_type == "IsNaN"]


def _softmax_gradient_readers(nodes) -> list:
    """The nodes reading a softmax cross-entropy's gradient (or a reshape of it): ORT's, or a vocabulary block's
    probabilities times the loss gradient (export/vocabulary_loss.py)."""
    found: set[str] = set()
    for n in nodes:
        blockwise = n.name.startswith("vocabulary_loss/pass2/") and n.name.endswith("/weighted")
        if blockwise or n.op_type == "SoftmaxCrossEntropyLossGrad" or (n.op_type == "Reshape" and n.input[0] in found):
            found.update(n.output[:1])
    return [n for n in nodes if any(i in found for i in n.input) and n.op_type != "Reshape"]


def test_lm_layer_gradients_are_int8_and_the_softmax_gradient_fp32(lm, tmp_path):
    """The layers' input gradients multiply int8 weights (the gradient quantized per row); the lm_head's, which
    reads the softmax gradient (one -1 among many small probabilities, which 7-bit rounding zeroes: SmolLM2
    diverged with it), multiplies dequantized weights. `int8_gradients=False` makes them all fp32."""
    source, bundle, _ = lm["llama"]
    assert mf.Manifest.load(bundle).stats["int8_gradients"] is True
    nodes = list(onnx.load(str(bundle / mf.TRAINING_MODEL)).graph.node)
    assert [n.name for n in nodes if n.op_type == "MatMulIntegerToFloat" and "_Grad" in n.name]
    readers = _softmax_gradient_readers(nodes)
    assert readers and not [n.name for n in readers if "row_int8" in n.name or n.op_type == "QuantizeLinear"]
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(n.op_type == "MatMul" and n.input[1] in dequantized for n in readers)
    assert any(n.op_type == "DequantizeLinear" for n in nodes)  # the lm_head's rows, for its fp32 gradient
    out = tmp_path / "fp32"
    options = ExportOptions(max_length=16, int8_gradients=False)
    export(source, out, lora=LoraSpec(r=2, target_modules=("q_proj",)), options=options)
    assert mf.Manifest.load(out).stats["int8_gradients"] is False
    nodes = onnx.load(str(out / mf.TRAINING_MODEL)).graph.node
    assert not [n.name for n in nodes if n.op_type == "MatMulIntegerToFloat" and "_Grad" in n.name]


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_device_loss_is_transformers_shifted_loss(lm, family, text_file, tmp_path):
    """fp32 bundle: the device's loss on padded text and on chat (prompt tokens -100) is transformers' own."""
    source, _, fp32 = lm[family]
    session, host = TrainingSession(fp32), _host_model(source)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:3]}) + "\n")
    for path in (text_file, chat):
        data = session.load_data(path)
        report = session.evaluate(data, batch_size=len(data))
        loss, tokens = _host_loss(host, data)
        assert report.tokens == tokens and report.loss == pytest.approx(loss, abs=1e-4)
        assert report.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


def test_text_is_cut_into_blocks_and_jsonl_texts_are_examples(lm, text_file, tmp_path):
    source, bundle, _ = lm["llama"]
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(source)(TEXT)["input_ids"] + [3]  # bos ... eos
    data = TrainingSession(bundle).load_data(text_file)
    ids, mask = data.features["input_ids"], data.features["attention_mask"].astype(bool)
    assert ids.shape[1] == 32 and list(ids[mask]) == expected
    assert np.array_equal(data.labels[mask], ids[mask]) and (data.labels[~mask] == IGNORE).all()
    assert np.array_equal(data.features["position_ids"][0], np.arange(32))
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "hello world"}\n{"text": "the cat sat on a mat"}\n')
    texts = TrainingSession(bundle).load_data(lines)
    assert texts.features["input_ids"].tolist() == [[2, 14, 15, 3, 0, 0, 0, 0], [2, 6, 7, 8, 9, 10, 11, 3]]
    assert texts.labels[0].tolist() == [2, 14, 15, 3, IGNORE, IGNORE, IGNORE, IGNORE]
    session = TrainingSession(bundle)  # a batch of the short row alone is trimmed: its labels with its inputs
    report = session.train(texts, TrainConfig(epochs=1, batch_size=1, shuffle=False))
    assert report.steps == 2 and report.stopped == "complete"


def test_chat_loss_is_on_assistant_turns_only(lm, tmp_path):
    """Labels are -100 on system and user turns and the assistant header; the assistant's words and end token score."""
    source, bundle, _ = lm["llama"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    data = TrainingSession(bundle).load_data(path)
    full = tokenizer.apply_chat_template(CHAT, tokenize=True)
    expected = [IGNORE] * len(full)
    for i, message in enumerate(CHAT):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(CHAT[:i], tokenize=True, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(CHAT[: i + 1], tokenize=True))
            expected[start:end] = full[start:end]
    assert data.features["input_ids"][0].tolist() == full
    assert data.labels[0].tolist() == expected
    scored = tokenizer.convert_ids_to_tokens([t for t in expected if t != IGNORE])
    assert scored == "i am fine thank you <|im_end|> good day to you <|im_end|>".split()
    no_assistant = tmp_path / "user.jsonl"
    no_assistant.write_text(json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(DataError, match="line 1: the conversation has no assistant message"):
        TrainingSession(bundle).load_data(no_assistant)


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_greedy_generation_with_cache_is_without_cache_and_transformers(lm, family):
    """One position per new token gives the tokens the whole prefix gives, and transformers' generate (fp32)."""
    source, int8, fp32 = lm[family]
    for bundle in (int8, fp32):
        session = TrainingSession(bundle)
        session.set_trainable(_random_adapter(session))
        cached = session.generate("the cat sat", 16)
        assert cached.token_ids == session.generate("the cat sat", 16, use_cache=False).token_ids
    adapter = session.save_adapter(Path(fp32).parent / "adapter")
    host = _host_model(source, adapter)
    prompt = torch.tensor([session._task.tokenizer.encode("the cat sat").ids])
    with torch.no_grad():
        expected = host.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert cached.token_ids == expected[0, prompt.shape[1] :].tolist()


def test_generation_uses_the_current_adapter_and_samples_reproducibly(lm):
    session = TrainingSession(lm["llama"][1])
    base = session.generate("hello", 12).token_ids
    session.set_trainable(_random_adapter(session, scale=1.0))
    assert session.generate("hello", 12).token_ids != base
    one = session.generate("hello", 12, temperature=1.0, top_k=8, top_p=0.9, seed=3)
    assert one.token_ids == session.generate("hello", 12, temperature=1.0, top_k=8, top_p=0.9, seed=3).token_ids
    assert session.generate("hello", 12, temperature=1.0, top_k=1, seed=5).token_ids == session.generate("hello", 12).token_ids
    chat = session.generate([{"role": "user", "content": "hello"}], 4)
    assert chat.prompt_tokens == len("<|im_start|> user hello <|im_end|> <|im_start|> assistant".split())
    with pytest.raises(InputError, match="top_p"):
        session.generate("hello", 4, temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_generation_session_generates_as_the_training_session(lm, family, mlp_bundle, tmp_path):
    """Generation alone (no training state): the exported values with no adapter, then a loaded adapter's, greedy
    and seeded sampling alike, on the int8 and the fp32 bundle."""
    for bundle in lm[family][1:]:
        _generates_as_the_training_session(bundle, tmp_path / Path(bundle).name)
    with pytest.raises(InputError, match="not a causal language model"):
        GenerationSession(mlp_bundle)


def _generates_as_the_training_session(bundle: Path, tmp_path: Path) -> None:
    trainer, generator = TrainingSession(bundle), GenerationSession(bundle)
    sample = dict(temperature=1.0, top_k=8, seed=3)
    assert generator.generate("hello", 12).token_ids == trainer.generate("hello", 12).token_ids
    values = _random_adapter(trainer, scale=1.0)
    trainer.set_trainable(values)
    adapter = trainer.save_adapter(tmp_path / "adapter")
    generator.load_adapter(adapter)
    for kwargs in ({}, sample):
        assert generator.generate("hello", 12, **kwargs).token_ids == trainer.generate("hello", 12, **kwargs).token_ids
    assert GenerationSession(bundle, adapter).generate("hello", 12).token_ids == trainer.generate("hello", 12).token_ids


def test_generation_stops_at_eos(lm):
    """Generation ends on the bundle's eos id (here a token greedy decoding reaches), which is not in the text."""
    import dataclasses

    session = TrainingSession(lm["llama"][1])
    session.set_trainable(_random_adapter(session))
    greedy = session.generate("hello", 12)
    assert greedy.stopped == "max_new_tokens" and len(greedy.token_ids) == 12
    stop = greedy.token_ids[4]
    first = greedy.token_ids.index(stop)
    session._task.task = dataclasses.replace(session._task.task, eos_token_id=stop)  # as a bundle with that eos
    result = session.generate("hello", 12)
    assert result.stopped == "eos" and result.token_ids == greedy.token_ids[: first + 1]
    assert result.text == session._task.tokenizer.decode(greedy.token_ids[:first])


def test_generation_stops_at_any_stop_id(lm):
    """A chat turn ends on the template's end-of-turn token, not only on eos."""
    import dataclasses

    session = TrainingSession(lm["llama"][1])
    session.set_trainable(_random_adapter(session))
    greedy = session.generate("hello", 12)
    stop = greedy.token_ids[4]
    first = greedy.token_ids.index(stop)
    assert session._task.task.eos_token_id != stop
    session._task.task = dataclasses.replace(session._task.task, stop_token_ids=(stop,))
    result = session.generate("hello", 12)
    assert result.stopped == "eos" and result.token_ids == greedy.token_ids[: first + 1]


def test_chat_cut_away_by_max_length_is_named_with_its_file_and_the_export_flag(lm, tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import main

    bundle = lm["llama"][1]  # max_length 32
    long = [{"role": "system", "content": "good day " * 20}, *CHAT[1:3]]
    path = tmp_path / "chat.ndjson"  # .ndjson reads as .jsonl
    path.write_text(json.dumps({"messages": long}) + "\n")
    with pytest.raises(DataError, match=f"{path}: nothing to learn from: .* past the bundle's 32 tokens"):
        TrainingSession(bundle).load_data(path)
    result = CliRunner().invoke(main, ["train", str(bundle), "--data", str(path)])
    assert result.exit_code == 1 and "exported with a longer edgepeft export --max-length takes them" in result.output


def test_a_model_directory_without_a_tokenizer_is_refused_in_one_line(tmp_path):
    from edgepeft.errors import ExportError

    source = tiny_lm.make_dir("llama", tmp_path / "model")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    with pytest.raises(ExportError, match="the tokenizer is missing"):
        export(bare, tmp_path / "bundle", lora=LoraSpec(r=2, target_modules=("q_proj",)))
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("flag, value, words", [("--max-length", "1", "too short"),
                                                ("--max-length", "129", "exceeds the model's 128 positions"),
                                                ("--labels", "a,b", "a causal LM predicts tokens")])  # fmt: skip
def test_export_refuses_a_causal_lm_option_in_the_clis_words(tmp_path, flag, value, words):
    from click.testing import CliRunner

    from edgepeft.cli import main

    source = tiny_lm.make_dir("llama", tmp_path / "model")
    result = CliRunner().invoke(main, ["export", str(source), "--out", str(tmp_path / "b"), flag, value])
    assert result.exit_code == 1 and f"Error: {flag} " in result.output and words in result.output
    assert not (tmp_path / "b").exists()


# Mistral-Instruct's template in short (bos and eos tokens, its own error on a turn out of order) and Llama 3.1's
# date (strftime_now): the variables and functions transformers' `apply_chat_template` gives a template.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('no date') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_a_chat_template_renders_as_transformers_renders_it(tmp_path):
    """bos_token, eos_token, strftime_now and raise_exception: training data and a chat prompt are the tokens
    `apply_chat_template` gives on the host; the template's own refusal is one DataError naming the line."""
    from transformers import AutoTokenizer

    source = tiny_lm.make_dir("llama", tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = MISTRAL_TEMPLATE
    tokenizer.save_pretrained(source)
    bundle = tmp_path / "bundle"
    export(source, bundle, lora=LoraSpec(r=2, target_modules=("q_proj",)), options=ExportOptions(max_length=32))
    chat = CHAT[1:3]  # user, assistant
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    session = TrainingSession(bundle)
    with pytest.raises(DataError, match="line 2: .*chat template refuses .*roles must alternate"):
        session.load_data(path)
    path.write_text(json.dumps({"messages": chat}) + "\n")
    data = session.load_data(path)
    full = tokenizer.apply_chat_template(chat, tokenize=True)
    assert data.features["input_ids"][0].tolist()[: len(full)] == full and full[0] == tokenizer.bos_token_id
    scored = tokenizer.convert_ids_to_tokens([t for t in data.labels[0].tolist() if t != IGNORE])
    assert scored == "i am fine thank you </s>".split()
    prompt = session.generate(chat[:1], 2)
    assert prompt.prompt_tokens == len(tokenizer.apply_chat_template(chat[:1], tokenize=True))


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_generation_stops_where_the_models_context_is_full(lm, family):
    """A prompt and its continuation take at most the model's positions (GPT-2's position table ends there; a
    rotary model would otherwise grow its cache without end); a prompt that fills them is refused."""
    import dataclasses

    bundle = lm[family][1]
    session = TrainingSession(bundle)
    assert session.manifest.task.max_positions == 128  # the tiny configs' max_position_embeddings / n_positions
    session._task.task = dataclasses.replace(session._task.task, eos_token_id=None, stop_token_ids=())  # no stop
    prompt = "the cat sat on a mat"
    result = session.generate(prompt, 500)
    prompt_tokens = result.prompt_tokens
    assert result.stopped == "max_positions" and prompt_tokens + len(result.token_ids) == 128
    assert session.generate(prompt, 128 - prompt_tokens).stopped == "max_new_tokens"
    from click.testing import CliRunner

    from edgepeft.cli import main

    refused = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "the " * 128])
    assert refused.exit_code == 2 and "'--prompt'" in refused.output and "128 positions" in refused.output


def test_a_start_token_named_eos_gives_way_to_the_config_eos(tmp_path):
    """SmolLM2's tokenizer converted from GGUF names <|im_start|> (its bos) as eos; the config's eos is right."""
    source = tiny_lm.make_dir("llama", tmp_path / "model", eos_token="<s>")
    out = tmp_path / "bundle"
    export(source, out, lora=LoraSpec(r=2, target_modules=("q_proj",)), options=ExportOptions(max_length=16))
    task = mf.Manifest.load(out).task
    assert (task.bos_token_id, task.eos_token_id, task.stop_token_ids) == (2, 3, (3, 5))


def test_manifest_refuses_bad_stop_ids(lm):
    data = json.loads(mf.Manifest.load(lm["llama"][1]).to_json())
    data["task"]["stop_token_ids"] = [3, "x"]
    with pytest.raises(BundleError, match="stop_token_ids"):
        mf.Manifest.from_dict(data)
    del data["task"]["stop_token_ids"]  # a manifest written before the field: eos alone stops
    assert mf.Manifest.from_dict(data).task.stops == {3}


@pytest.mark.parametrize("family", tiny_lm.FAMILIES)
def test_device_training_lowers_perplexity_and_peft_agrees(lm, family, text_file, tmp_path):
    """int8 device training lowers perplexity; the saved adapter loads into PEFT and scores the same text the same."""
    source, bundle, _ = lm[family]
    session = TrainingSession(bundle)
    data = session.load_data(text_file)
    before = session.evaluate(data).perplexity
    session.train(data, TrainConfig(epochs=6, batch_size=4, learning_rate=1e-2, seed=0))
    after = session.evaluate(data, batch_size=len(data))
    assert after.perplexity < 0.6 * before
    adapter = session.save_adapter(tmp_path / "adapter")
    host_loss, _ = _host_loss(_host_model(source, adapter), data)
    assert math.exp(host_loss) == pytest.approx(after.perplexity, rel=0.02)  # fp32 host against int8 device


def test_host_peft_adapter_loads_into_the_bundle(lm, text_file, tmp_path):
    """A LoRA made with PEFT on the host (random B) gives the device the host's loss (fp32 bundle)."""
    import peft

    source, _, fp32 = lm["llama"]
    host = peft.get_peft_model(_host_model(source), peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(TARGETS["llama"])))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in host.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    host.save_pretrained(tmp_path / "host_adapter")
    session = TrainingSession(fp32)
    session.load_adapter(tmp_path / "host_adapter")
    data = session.load_data(text_file)
    loss, _ = _host_loss(host.eval(), data)
    assert session.evaluate(data, batch_size=len(data)).loss == pytest.approx(loss, abs=1e-4)


def test_lm_refuses_what_it_cannot_do(lm, tmp_path):
    source, bundle, _ = lm["gpt2"]
    session = TrainingSession(bundle)
    with pytest.raises(InputError, match="generate"):
        session.predict(["hello"])
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match="plain text"):
        session.load_data(csv)
    from edgepeft.errors import ExportError

    with pytest.raises(ExportError, match="next-token"):
        export(source, tmp_path / "b", lora=LoraSpec(r=2, target_modules=("c_attn",)), options=ExportOptions(loss="mse"))


def test_cli_trains_evaluates_and_generates(lm, text_file, tmp_path):
    """`edgepeft train` / `eval` (perplexity) / `generate --prompt` on an LM bundle; predict refuses it."""
    from click.testing import CliRunner

    from edgepeft.cli import main

    bundle, adapter, report = str(lm["gpt2"][1]), str(tmp_path / "adapter"), str(tmp_path / "eval.json")
    run = CliRunner().invoke
    train_report = tmp_path / "train.json"
    trained = run(main, ["train", bundle, "--data", str(text_file), "--epochs", "2", "--batch-size", "4",
                         "--lr", "1e-2", "--adapter-out", adapter, "--eval-data", str(text_file),
                         "--report", str(train_report)])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    figures = json.loads(train_report.read_text())  # --eval-data: perplexity before and after, in the summary too
    assert figures["perplexity_after"] < figures["perplexity_before"]
    assert figures["perplexity_after"] == pytest.approx(math.exp(figures["eval_loss"]))
    assert f"perplexity {figures['perplexity_before']:.2f} -> {figures['perplexity_after']:.2f}" in trained.output
    evaluated = run(main, ["eval", bundle, "--data", str(text_file), "--adapter", adapter, "--report", report])
    assert evaluated.exit_code == 0 and "perplexity" in evaluated.output
    figures = json.loads(Path(report).read_text())
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
    session = TrainingSession(bundle)
    session.load_adapter(adapter)
    expected = session.generate("the cat", 6).text
    generated = run(main, ["generate", bundle, "--prompt", "the cat", "--adapter", adapter, "--max-new-tokens", "6",
                           "--json"])  # fmt: skip
    assert generated.exit_code == 0 and json.loads(generated.stdout.splitlines()[-1])["text"] == expected
    refused = run(main, ["predict", bundle, "--text", "hello"])
    assert refused.exit_code == 1 and "generate" in refused.output
    inspected = run(main, ["inspect", bundle])
    assert "causal_lm: blocks of 32 tokens, context 128 positions, chat template: yes" in inspected.output
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "the cat"}\n')
    refused = run(main, ["predict", bundle, "--data", str(jsonl)])  # refused before the file is read as a classifier's
    assert refused.exit_code == 1
    assert "causal language model" in refused.output and "edgepeft generate" in refused.output
    empty = run(main, ["generate", bundle, "--prompt", ""])
    assert empty.exit_code == 2 and "'--prompt': is empty" in empty.output
    plain = tmp_path / "plain"
    shutil.copytree(bundle, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["task"]["chat_template"] = None
    (plain / "manifest.json").write_text(json.dumps(manifest))
    no_template = run(main, ["generate", str(plain), "--prompt", "hello", "--chat"])
    assert no_template.exit_code == 2 and "'--chat': bundle" in no_template.output


def test_lm_device_commands_never_load_torch(lm, text_file, tmp_path):
    """train, eval and generate on an LM bundle, where torch is installed, end with torch not loaded."""
    from test_no_torch import _device_command

    bundle, adapter = str(lm["llama"][1]), str(tmp_path / "adapter")
    for command in (
        ["train", bundle, "--data", str(text_file), "--epochs", "1", "--batch-size", "4", "--adapter-out", adapter],
        ["eval", bundle, "--data", str(text_file), "--adapter", adapter],
        ["generate", bundle, "--prompt", "the cat", "--adapter", adapter, "--max-new-tokens", "4"],
    ):
        assert _device_command(*command) == {"code": 0, "torch": False}, command
