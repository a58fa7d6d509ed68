"""Tiny real tokenizers trained in-process with the `tokenizers` library (milliseconds, no downloads), wrapped as
transformers fast tokenizers: a byte-level BPE (GPT-2/Qwen style), a SentencePiece-style unigram with byte fallback
(Llama style), and a WordPiece (BERT style, a tokenizer whose tokens have no bytes of their own)."""

from __future__ import annotations

import json

CORPUS = [
    "the cat sat on the mat and the theme of the story was the cat",
    "12345 + 678 = 13023; 999 * 12 = 11988",
    "héllo wörld, naïve café crème brûlée",
    "日本語のテキスト 東京 大阪 日本",
    "emoji 🙂 and 🚀 and ü € £",
    "Question: what is 23 + 19?\nAnswer: 42 #### 42",
]

CHAT_TEMPLATE_B = (
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>> {% endif %}"
)


def byte_level_bpe(vocab_size: int = 400, corpus=CORPUS, name: str = "tiny-bpe", chat_template: str | None = None):
    """Byte-level BPE with <|endoftext|> (pad) and <|im_end|> (eos), all 256 bytes in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.name_or_path = name
    if chat_template:
        hf.chat_template = chat_template
    return hf


def sentencepiece_unigram(vocab_size: int = 120, corpus=CORPUS, name: str = "tiny-sp"):
    """A unigram model with SentencePiece's conventions: '▁' for spaces (prepended to the text), <0xNN> byte
    fallback for what the vocabulary lacks, Llama's decoder (Replace '▁', ByteFallback, Fuse, Strip one space);
    <unk>, <s> (bos), </s> (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    base = Tokenizer(models.Unigram())
    base.pre_tokenizer = meta
    base.train_from_iterator(list(corpus) * 20, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    vocab = [tuple(v) for v in json.loads(base.to_str())["model"]["vocab"]]
    vocab += [(f"<0x{b:02X}>", -30.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 clean_up_tokenization_spaces=False)
    hf.name_or_path = name
    return hf


def wordpiece(vocab_size: int = 200, corpus=CORPUS, name: str = "tiny-wordpiece"):
    """BERT-style WordPiece ('##' continuations, words joined by spaces on decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(corpus) * 20, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]",
                                 clean_up_tokenization_spaces=False)
    hf.name_or_path = name
    return hf
