"""`edgepeft demo lm`: SmolLM2-135M on Emma, run as a user runs it (a short run: a few training steps, ~4 min)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.austen_lm_data import derive

# ../shared/data/austen-novels from the project's root (searched upwards: a git worktree sits deeper)
NOVELS_DIR = next((d / "shared" / "data" / "austen-novels" for d in Path(__file__).resolve().parents
                   if (d / "shared" / "data" / "austen-novels").is_dir()), Path("/nonexistent"))  # fmt: skip


def _cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.skipif(not NOVELS_DIR.is_dir(), reason="the six novels are not on this machine")
def test_shipped_texts_are_their_derivation_from_the_novels():
    shipped = resources.files("edgepeft").joinpath("data/austen-lm")
    derived = derive(NOVELS_DIR)
    assert sorted(derived) == sorted(["emma-train.txt"] + [f"heldout/{n}.txt" for n in
                                      ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                       "sensesensibility")])  # fmt: skip
    for name, text in derived.items():
        assert shipped.joinpath(name).read_text(encoding="utf-8") == text, name
    emma = (NOVELS_DIR / "emma.txt").read_text(encoding="utf-8")
    train, heldout = derived["emma-train.txt"], derived["heldout/emma.txt"]
    last_train, first_heldout = train.strip().split("\n\n")[-1], heldout.strip().split("\n\n")[0]
    flat = " ".join(emma.split())
    assert flat.index(last_train) < flat.index(first_heldout)  # held out: after everything trained on


def test_demo_lm_refuses_a_directory_of_the_users_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = _cli("demo", "lm", "--out", str(tmp_path))
    assert run.returncode == 1
    assert str(tmp_path) in run.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_max_steps_is_for_the_lm_demo_only(tmp_path):
    run = _cli("demo", "--max-steps", "3", "--out", str(tmp_path / "d"))
    assert run.returncode == 2
    assert "--max-steps" in run.stderr
    assert not (tmp_path / "d").exists()


def test_demo_lm_trains_smollm2_on_the_device_and_the_host_agrees(tmp_path):
    report = tmp_path / "demo.json"
    run = _cli("demo", "lm", "--out", str(tmp_path / "demo"), "--max-steps", "8", "--report", str(report),
               timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(report.read_text())
    before, after = figures["perplexity_before"], figures["perplexity_after"]
    assert sorted(before) == sorted(after) and len(before) == 6
    assert all(math.isfinite(v) and 1 < v < 1000 for v in [*before.values(), *after.values()])
    assert after["emma"] < before["emma"]  # eight steps on Emma already lower its perplexity
    assert figures["train_steps"] == 8 and figures["train_tokens"] > 8 * 200
    assert figures["device_torch_loaded"] is False
    assert len(figures["continuations"]) == 3
    assert all(c["before"] and c["after"] for c in figures["continuations"])
    assert figures["train_tokens_per_s"] > 0 and figures["generate_tokens_per_s"] > 0
    assert 0 < figures["adapter_kb"] < 20_000 and figures["bundle_mb"] < 0.7 * 540

    # the adapter on the host: PEFT over the fp32 model scores Emma's held-out text as the device did (within 2%)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    demo = tmp_path / "demo"
    model = AutoModelForCausalLM.from_pretrained(demo / "smollm2-135m-instruct", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, demo / "adapter").eval()
    host = _host_perplexity(model, demo / "bundle", demo / "heldout" / "emma.txt")
    assert abs(host / after["emma"] - 1) < 0.02, (host, after["emma"])


def _host_perplexity(model, bundle: Path, text_file: Path) -> float:
    """Perplexity as the device computes it: the bundle's tokenizer, eos appended, blocks of max_length."""
    import torch
    from tokenizers import Tokenizer

    manifest = json.loads((bundle / "manifest.json").read_text())
    task = manifest["task"]
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text_file.read_text()).ids + [task["eos_token_id"]]
    size = task["max_length"]
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), size):
            block = torch.tensor([ids[start : start + size]])
            if block.shape[1] < 2:
                continue
            out = model(input_ids=block, labels=block)
            loss_sum += float(out.loss) * (block.shape[1] - 1)
            tokens += block.shape[1] - 1
    return math.exp(loss_sum / tokens)
