"""`edgepeft generate`: continue a prompt with a causal language model bundle on the device (torch-free)."""

from __future__ import annotations

import json

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import count
from edgepeft.errors import PromptError


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--chat", is_flag=True, help="Send --prompt as a user message through the bundle's chat template.")
@click.option("--adapter", type=click.Path(), help="Adapter directory to generate with.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k likeliest tokens.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed of the sampler (reproducible sampling).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def generate(
    bundle: str,
    prompt: str,
    chat: bool,
    adapter: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Continue --prompt with BUNDLE (a causal LM) and the adapter; stops at the end-of-text token, after
    --max-new-tokens, or where the model's context (its positions) is full.

    Generation alone: the bundle's training state is not loaded (a `GenerationSession`)."""
    if not prompt:
        raise click.BadParameter("is empty: give the text to continue", param_hint="'--prompt'")
    from edgepeft.runtime import GenerationSession, open_bundle

    opened = open_bundle(bundle)
    task = opened.manifest.task
    if chat and task is not None and not task.chat_template:  # before the generation graph is loaded
        raise click.BadParameter(f"bundle {bundle} has no chat template: give --prompt as plain text",
                                 param_hint="'--chat'")  # fmt: skip
    session = GenerationSession(opened, adapter)
    source = [{"role": "user", "content": prompt}] if chat else prompt
    try:
        result = session.generate(source, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed)  # fmt: skip
    except PromptError as e:
        raise click.BadParameter(str(e).removeprefix("the prompt "), param_hint="'--prompt'") from None
    speed = result.tokens_per_second
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                               "stopped": result.stopped, "tokens_per_second": speed}))  # fmt: skip
        return
    click.echo(result.text)
    rate = f", {speed:.1f} tokens/s" if speed else ""
    click.echo(f"{count(len(result.token_ids), 'token')} ({result.stopped}){rate}", err=True)
