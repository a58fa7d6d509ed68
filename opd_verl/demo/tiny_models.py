"""Tiny tokenizers and Qwen2 models built locally (no downloads), for tests, demos and CPU runs.

    tok = build_tokenizer()                              # character-level, chat template, pad/eos
    model = build_qwen2(tok, hidden_size=128, num_layers=2, seed=0)
    save_model_dir("/tmp/tiny", tok, model)              # loadable by transformers, verl and vLLM

Pure functions; every size is a parameter, so a teacher larger than the student comes from the same code.
vLLM's CPU attention needs head_dim 32/64/...: the default 64 works, 16 does not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

# Special tokens (Qwen-style chat markers; the chat template below uses them).
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)

# Every printable ASCII character (digits, + - * / =, letters, punctuation, space) and the newline.
DEFAULT_CHARS: str = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n"
# Multi-character tokens (GSM8K's answer marker), matched whole.
DEFAULT_WORDS: tuple[str, ...] = ("####",)

# Chat template in Qwen's format; verl calls tokenizer.apply_chat_template(messages, add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(
    vocab_chars: str | Iterable[str] = DEFAULT_CHARS,
    words: Sequence[str] = DEFAULT_WORDS,
    all_bytes: bool = False,
    model_max_length: int = 2048,
):
    """A character-level Qwen2Tokenizer (byte-level BPE): one token per character of `vocab_chars`
    (ASCII), plus `words` (multi-character tokens such as "####", matched whole), the chat markers
    <|im_start|>/<|im_end|>, pad (<|endoftext|>) and eos (<|im_end|>), and a Qwen chat template.

    It is a real Qwen2Tokenizer, so AutoTokenizer (which forces Qwen2Tokenizer for model_type qwen2),
    verl and vLLM all load the same tokenizer from the saved directory. Characters outside the vocabulary
    are dropped by byte-level BPE; `all_bytes=True` adds all 256 bytes (no character is ever dropped).
    """
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    byte_map = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    for ch in vocab_chars:
        data = ch.encode("utf-8")
        if len(ch) != 1 or len(data) != 1:
            raise ValueError(f"vocab_chars must be single ASCII characters, got {ch!r}; put longer tokens in words=")
        vocab.setdefault(byte_map[data[0]], len(vocab))
    if all_bytes:
        for b in range(256):
            vocab.setdefault(byte_map[b], len(vocab))
    for word in words:
        if not word.isascii():
            raise ValueError(f"word {word!r} must be ASCII")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=UNK_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[AddedToken(IM_START, special=True, normalized=False)],
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    # multi-character words are added tokens: matched whole before byte-level splitting
    new_words = [w for w in words if len(w) > 1]
    if new_words:
        tokenizer.add_tokens([AddedToken(w, special=False, normalized=False) for w in new_words])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_qwen2(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    head_dim: int = 64,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    vocab_multiple: int = 1,
    family: str = "qwen2",
):
    """A randomly initialised Qwen2ForCausalLM (float32) whose vocabulary fits `tokenizer` (``family="qwen3"``: a
    Qwen3ForCausalLM of the same sizes, with Qwen3's per-head q/k norms).

    hidden_size must be a multiple of head_dim. The vocabulary is exactly the tokenizer's by default
    (`vocab_multiple=1`): verl masks rollout logits of ids >= len(tokenizer) (its "OOV tail") while the actor's
    log-probs cover the whole vocabulary, so untrained padding rows of a random model would make the rollout's
    and the actor's log-probs differ (by ~log(padded/len(tokenizer)) nats). The same seed gives the same weights.
    """
    import torch
    import transformers

    if family not in ("qwen2", "qwen3"):
        raise ValueError(f"family={family!r}: qwen2 or qwen3")
    prefix = family.capitalize()
    config_cls, model_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of head_dim={head_dim}")
    num_heads = hidden_size // head_dim
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    model.eval()
    return model


def save_model_dir(path: str | os.PathLike, tokenizer=None, model=None, **model_kwargs) -> str:
    """Save tokenizer and model (built with defaults/`model_kwargs` when not given) into `path`.

    Writes config.json, generation_config.json, model.safetensors, tokenizer files; returns the path.
    """
    from transformers import GenerationConfig

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = model if model is not None else build_qwen2(tokenizer, **model_kwargs)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_model_dir(path: str | os.PathLike, hidden_size: int = 128, num_layers: int = 2, seed: int = 0, **kw) -> str:
    """Convenience: the default tokenizer plus a Qwen2 of the given size, saved into `path`."""
    tokenizer = build_tokenizer()
    model = build_qwen2(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed, **kw)
    return save_model_dir(path, tokenizer, model)


if __name__ == "__main__":  # python -m opd_verl.demo.tiny_models OUT_DIR [hidden] [layers] [seed]
    import sys

    args = sys.argv[1:]
    if not args:
        raise SystemExit("usage: python -m opd_verl.demo.tiny_models OUT_DIR [hidden_size] [num_layers] [seed]")
    out = build_model_dir(
        args[0],
        hidden_size=int(args[1]) if len(args) > 1 else 128,
        num_layers=int(args[2]) if len(args) > 2 else 2,
        seed=int(args[3]) if len(args) > 3 else 0,
    )
    print(out)
