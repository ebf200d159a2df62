"""A tiny random-weight Llama and its byte-level BPE tokenizer, built locally for tests and demos.

Nothing here touches a model hub: the tokenizer is trained with the ``tokenizers`` library on a
short built-in corpus and the weights come from a fixed seed, so the same directory is produced
on every machine. The result loads through transformers' (and vLLM's) ordinary
``from_pretrained`` code paths, which is the point: tests exercise real loading and generation.

Run ``python -m pacore.testing.tiny_model DIR`` to write one into ``DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "EOS_TOKEN", "build_tiny_llama"]

BOS_TOKEN = "<|begin|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
_SPECIAL_TOKENS = [BOS_TOKEN, PAD_TOKEN, "<|im_start|>", EOS_TOKEN]

# ChatML: a format every chat-aware loader understands; ``add_generation_prompt`` opens the
# assistant's turn so that generation continues as the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "PA Core routes every request to the provider that fits it best.",
    "Memory makes each conversation searchable by meaning.",
    "Self-hosted models run on the cluster, and agents run behind the firewall.",
    "system user assistant tool: hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "SELECT id, content FROM messages WHERE user_id = 42 ORDER BY created_at;",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: every string encodes without unknown tokens and decodes back exactly.
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write a tiny random-weight Llama (config, safetensors weights, tokenizer) into ``path``.

    One attention head of width 64 keeps the model tiny while staying a head size every
    attention backend supports (vLLM's included). The same arguments give the same files.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=hidden_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pacore.testing.tiny_model DIR", file=sys.stderr)
        return 2
    print(build_tiny_llama(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
