"""Tiny and small decoder configs in the three families the Bielik models use.

Widths are multiples of 256 so llama.cpp's K-quants (256-wide super-blocks) apply to every matrix;
attention uses GQA like the real models.
"""

from __future__ import annotations

from typing import Any

from orlik.errors import UnknownNameError

ARCHS = ("llama", "mistral", "qwen2")

SIZES: dict[str, dict[str, Any]] = {
    # ~8.9M parameters with an 8k vocab: trains in minutes on 2 CPU cores.
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    # ~100M parameters: large enough that bits-per-weight targets mean something.
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    # ~112M parameters with a 32k vocab (49M of them embeddings, which cost no compute): the
    # measurement model of docs/real-model.md, sized to train on 2 CPU cores in about an hour.
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
}  # fmt: skip

# Chat templates. ChatML for the qwen2 family (Bielik v3); the [INST] template of the Bielik 7B card
# for llama/mistral.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{% set content = system + '\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}"
    "{% endfor %}"
)


def chat_template(arch: str) -> str:
    return CHATML if arch == "qwen2" else INST


def make_config(arch: str, size: str, vocab_size: int, *, bos: int = 1, eos: int = 2, pad: int = 3) -> Any:
    """A transformers config object for `arch` at `size`."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in ARCHS:
        raise UnknownNameError("architecture", arch, ARCHS)
    if size not in SIZES:
        raise UnknownNameError("size", size, list(SIZES))
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.02,
        **SIZES[size],
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, attention_bias=False, **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **common)
    # Qwen2 uses q/k/v biases and, in its small models, tied embeddings.
    return Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common)
