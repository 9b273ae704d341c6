"""A stand-in tokenizer of Llama-3's vocabulary size, for serving benchmarks of shipped configs with dummy weights.

`load_format="dummy"` on a shipped config (llama-3-8b, ...) has no tokenizer: the server then answers with token ids
only and skips detokenization, the part of a real server's work that grows with its output rate. This trains a byte-
level BPE (the `tokenizers` package, as Llama-3's tokenizer is a byte-level BPE) of 128,256 entries on the Python
source installed beside it (the standard library, then torch, transformers, ...), so that `shardllm serve llama-3-8b
--load_format dummy --tokenizer DIR` detokenizes every output token as a real server does. It is not Llama-3's
tokenizer: its ids mean other strings; only its size and its kind match. Writes DIR/tokenizer.json and
DIR/tokenizer_config.json (~10 MB; generated, never committed). Usage: python benchmarks/make_bench_tokenizer.py DIR
[--vocab_size 128256] [--max_mb 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time


def _py_files(root: str):
    """The .py files under `root`, in sorted order (no __pycache__, no nested site-packages)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        yield from (os.path.join(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))


def corpus(max_bytes: int):
    """The .py files of the standard library, then of the installed packages (torch, transformers, ...), until
    max_bytes have been yielded (the standard library alone runs out of merges near 66K entries)."""
    seen = 0
    for root in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for path in _py_files(root):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            seen += len(text)
            yield text
            if seen >= max_bytes:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--vocab_size", type=int, default=128256, help="entries, special tokens included (Llama-3's)")
    ap.add_argument("--max_mb", type=float, default=150.0, help="MB of training text at most")
    a = ap.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    t0 = time.time()
    tok.train_from_iterator(corpus(int(a.max_mb * 1e6)), trainer=trainer)
    os.makedirs(a.out_dir, exist_ok=True)
    tok.save(os.path.join(a.out_dir, "tokenizer.json"))
    with open(os.path.join(a.out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0], "eos_token": special[1],
                   "model_max_length": 131072}, f)
    print(f"{a.out_dir}: {tok.get_vocab_size()} entries, trained in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
