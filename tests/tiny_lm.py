"""Tiny causal language model directories (Llama and GPT-2; Qwen2 and Gemma too), made offline in a second.

Each is built from its transformers config (hidden 32, 2 layers, vocab 64) with a WordLevel tokenizer that
knows a few words, bos/eos/pad tokens and a ChatML chat template (SmolLM2's), and its weights perturbed so
the random model's next-token distribution is not flat.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the cat sat on a mat dog ran hello world user assistant system what is your name i am fine "
         "thank you good day she said he was very happy to see her again").split()  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = ("llama", "gpt2")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def config(family: str):
    import transformers as t

    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if family == "llama":
        return t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                             tie_word_embeddings=True, **ids)  # fmt: skip
    if family == "qwen2":  # Llama's layout with biases on q, k, v
        return t.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                             tie_word_embeddings=True, **ids)  # fmt: skip
    if family == "gemma":  # GELU (tanh) MLP, embeddings scaled by sqrt(hidden), one key/value head
        return t.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                             **ids)  # fmt: skip
    if family == "falcon":  # multi-query attention (Falcon-7B's layout): one key/value head, broadcast in attention
        return t.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                              new_decoder_architecture=False, multi_query=True, max_position_embeddings=128,
                              **ids)  # fmt: skip
    if family == "gpt2":
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=128,
                            tie_word_embeddings=True, **ids)  # fmt: skip
    raise KeyError(family)


def tokenizer(family: str, eos_token: str = "</s>"):
    """A WordLevel tokenizer as a PreTrainedTokenizerFast; Llama's adds <s> in front, GPT-2's adds nothing.

    `eos_token="<s>"` names the start token as eos, as SmolLM2's tokenizer converted from GGUF does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if family == "llama":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                               special_tokens=[("<s>", 2)])  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token=eos_token,
        chat_template=CHAT_TEMPLATE, model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def make_dir(family: str, directory: Path, scale: float = 0.5, eos_token: str = "</s>") -> Path:
    """Write the family's tiny causal LM and tokenizer into `directory`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(family))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * 0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(directory)
    tokenizer(family, eos_token).save_pretrained(directory)
    return directory
