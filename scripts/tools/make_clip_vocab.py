"""Build the CLIP tokenizer files shipped in ldm/modules/encoders/clip_tokenizer/.

Source: OpenAI CLIP's byte-pair-encoding table `bpe_simple_vocab_16e6.txt.gz`
(MIT licence, github.com/openai/CLIP; the same file ships inside the PyPI
packages `clip` and `open_clip_torch`). From it we write the two files that
transformers' CLIPTokenizer reads:

    vocab.json   49,408 entries: 256 byte symbols, the same 256 with the
                 end-of-word marker "</w>", 48,894 merged symbols, then
                 <|startoftext|> (49406) and <|endoftext|> (49407).
    merges.txt   "#version: 0.2" and the 48,894 merge rules in rank order.

Usage: python -m scripts.tools.make_clip_vocab path/to/bpe_simple_vocab_16e6.txt.gz
"""
import argparse
import gzip
import json
import os
import sys

from ldm.cli import HelpFormatter

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merge rules of the table


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are shifted past 255
            table[b] = chr(256 + extra)
            extra += 1
    # vocab order of the CLIP table: printable bytes first, then the shifted ones
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def build(bpe_gz: str) -> tuple[dict[str, int], list[str]]:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("bpe_gz")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "ldm", "modules", "encoders", "clip_tokenizer"))
    args = p.parse_args()
    vocab, merges = build(args.bpe_gz)
    if len(vocab) != 49408:
        sys.exit(f"{args.bpe_gz}: expected 49408 tokens, built {len(vocab)}")
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("vocab.json", json.dumps(vocab, ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))
    print(f"wrote vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges) to {args.out}")


if __name__ == "__main__":
    main()
