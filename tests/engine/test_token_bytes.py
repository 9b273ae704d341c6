"""TokenBytes: a token's own bytes, for byte-level BPE (the default model's tokenizer) and a SentencePiece-style
vocabulary with byte fallback (Llama 2's decoder), so that joining a split character's tokens rebuilds it."""

from __future__ import annotations

from shardllm.engine.detokenizer import TokenBytes, load_tokenizer
from shardllm.model_loader.default_model import default_model_path


def test_byte_level_tokens_keep_their_partial_characters():
    tok = load_tokenizer(default_model_path())
    tb = TokenBytes(tok)
    text = "Hi 😀 café ✓"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(tb(i) for i in ids) == text.encode()
    assert tb(tok.eos_token_id) == tok.decode([tok.eos_token_id]).encode()  # special tokens: their text


def test_sentencepiece_byte_fallback_and_spaces():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581hi": 257, "\u2581": 258, "h": 259,
             "i": 260, "hi": 261}
    backend = Tokenizer(models.BPE(vocab, [("h", "i"), ("\u2581", "hi")], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tb = TokenBytes(tok)
    assert tb(257) == b" hi"
    emoji = "😀".encode()
    ids = [1 + b for b in emoji]
    assert [tb(i) for i in ids] == [bytes([b]) for b in emoji]
    assert all("\ufffd" in tok.decode([i]) for i in ids)  # decoded alone, each is the replacement character
    assert b"".join(tb(i) for i in [257, *ids]).decode() == " hi😀"
