"""The causal-LM workload's measurements, each run in a fresh `edgepeft.bench.worker` process.

`lm_train`: training steps on one fixed batch of Emma blocks (edgepeft's runtime on the int8 bundle, or PyTorch
eager + PEFT on the fp32 model with the same LoRA spec and AdamW), one at a time on demand, so the harness can
interleave them with the other systems' steps; edgepeft's job then saves the adapter it trained, which the other
jobs use. `lm_generate`: greedy continuations of the prompts with that adapter (edgepeft's KV-cache graph, or
transformers' `generate` on the PEFT model, KV cache on); new tokens per second over the whole call, prompt
included. `lm_perplexity`: the
adapter's perplexity on a text file as the device scores it (the bundle's tokenizer, blocks of max_length).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepeft.bench.config import PYTORCH


def _blocks(job: dict[str, Any]) -> tuple[list[list[int]], int]:
    """The bundle's tokenization of a text file in blocks of its max_length (as the device reads plain text)."""
    from tokenizers import Tokenizer

    bundle = Path(job["bundle"])
    task = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["task"]
    tokenizer = Tokenizer.from_file(str(bundle / task["tokenizer"]))
    ids = tokenizer.encode(Path(job["text"]).read_text(encoding="utf-8")).ids + [task["eos_token_id"]]
    size = task["max_length"]
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1], task["eos_token_id"]


class _Torch:
    """The fp32 model with PEFT LoRA (the bundle's spec), eval mode, `threads` torch threads."""

    def __init__(self, job: dict[str, Any], adapter: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import peft
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        torch.set_num_threads(job["threads"])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        if adapter:
            self.model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            lora = job["lora"]
            config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                     target_modules=lora["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
            self.model = peft.get_peft_model(model, config)
        self.model.eval()  # no dropout, as the exported graph


def _train_step(job: dict[str, Any]) -> tuple[Callable[[], None], Callable[[], None], int]:
    """One training step on the first `batch` blocks as a call, a call that saves edgepeft's adapter to
    `adapter_out` (if given), and the tokens a step trains on."""
    import numpy as np

    blocks = _blocks(job)[0][: job["batch"]]
    tokens = sum(len(b) for b in blocks)
    if job["system"] == PYTORCH:
        system = _Torch(job)
        torch = system.torch
        ids = torch.tensor(blocks)
        trainable = [p for p in system.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=job["learning_rate"], **job["adamw"])

        def step() -> None:
            loss = system.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step, lambda: None, tokens

    from edgepeft.runtime import TrainConfig, TrainingSession
    from edgepeft.runtime.tasks.causal_lm import positions

    session = TrainingSession(job["bundle"], threads=job["threads"])
    ids = np.array(blocks, dtype=np.int64)
    mask = np.ones_like(ids)
    features = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    data = session.dataset({s.name: features[s.name] for s in session.manifest.inputs}, ids)
    config = TrainConfig(batch_size=len(blocks), learning_rate=job["learning_rate"], shuffle=False)

    def finish() -> None:
        if job.get("adapter_out"):
            session.save_adapter(job["adapter_out"])

    return lambda: session.train(data, config), finish, tokens


def lm_train(job: dict[str, Any]) -> dict[str, Any]:
    """Training steps on demand, for steps interleaved with other systems' (`edgepeft.bench.interleave`): once
    ready, each `step` line on stdin runs one step and answers its ms; `end` saves the adapter and returns."""
    import sys

    from edgepeft.bench.interleave import answer

    step, finish, tokens = _train_step(job)
    answer({"ready": True})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        started, start = time.time(), time.perf_counter()
        step()
        answer({"ms": (time.perf_counter() - start) * 1e3, "started": started})
    finish()
    return {"tokens_per_step": tokens}


def lm_generate(job: dict[str, Any]) -> dict[str, Any]:
    """Greedy continuations of each prompt (after one warm-up call); token ids and new tokens per second."""
    new = job["max_new_tokens"]
    warm, outputs, seconds = job["prompts"][0], [], 0.0
    if job["system"] == PYTORCH:
        system = _Torch(job, adapter=job["adapter"])
        torch = system.torch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(job["model"])
        stop = job["stop_token_ids"]

        margins: list[list[float]] = []  # each new token's top-1 minus top-2 logit: how near a tie the pick was

        def run(prompt: str) -> list[int]:
            ids = torch.tensor([job["prompt_ids"][prompt]])
            with torch.no_grad():
                out = system.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            do_sample=False, use_cache=True, eos_token_id=stop,
                                            pad_token_id=tokenizer.pad_token_id or stop[0],
                                            output_logits=True, return_dict_in_generate=True)  # fmt: skip
            top = [torch.topk(step[0], 2).values for step in out.logits]
            margins.append([float(t[0] - t[1]) for t in top])
            return out.sequences[0, ids.shape[1] :].tolist()

    else:
        from edgepeft.runtime import GenerationSession

        session = GenerationSession(job["bundle"], job["adapter"], threads=job["threads"])  # generation alone

        def run(prompt: str) -> list[int]:
            return session.generate(prompt, new).token_ids

    run(warm)
    for prompt in job["prompts"]:
        start = time.perf_counter()
        outputs.append(run(prompt))
        seconds += time.perf_counter() - start
    produced = sum(len(o) for o in outputs)
    result = {"token_ids": outputs, "new_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}
    if job["system"] == PYTORCH:
        result["margins"] = margins[1:]  # the warm-up call's first
    return result


def lm_teacher_forced(job: dict[str, Any]) -> dict[str, Any]:
    """edgepeft's greedy pick at each position of the other system's greedy continuations, forced in."""
    from edgepeft.runtime import TrainingSession

    session = TrainingSession(job["bundle"], threads=job["threads"])
    session.load_adapter(job["adapter"])
    picks = [session.teacher_forced(p, c) if c else [] for p, c in zip(job["prompts"], job["continuations"])]
    return {"picks": picks}


def lm_perplexity(job: dict[str, Any]) -> dict[str, Any]:
    """The adapter's perplexity on `text`, block by block as the device reads plain text."""
    if job["system"] == PYTORCH:
        system = _Torch(job, adapter=job["adapter"])
        torch = system.torch
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for block in _blocks(job)[0]:
                ids = torch.tensor([block])
                loss_sum += float(system.model(input_ids=ids, labels=ids).loss) * (len(block) - 1)
                tokens += len(block) - 1
        return {"perplexity": math.exp(loss_sum / tokens), "tokens": tokens}
    from edgepeft.runtime import TrainingSession

    session = TrainingSession(job["bundle"], threads=job["threads"])
    session.load_adapter(job["adapter"])
    result = session.evaluate(session.load_data(job["text"]), batch_size=1)
    return {"perplexity": result.perplexity, "tokens": result.tokens}
