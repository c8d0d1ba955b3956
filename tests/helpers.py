"""Shared by the tests: the reference CLIP tokenizer files, made offline from the merges file we ship."""
import gzip
import json

from nanocustom.tokenizer import BPE_PATH


def byte_symbols():
    """OpenAI's 256 byte symbols, written another way: printable Latin-1 stands for itself, the other 68 bytes
    (controls, space, nbsp, soft hyphen) get chr(256 + i) in byte order."""
    keep = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def write_clip_tokenizer_files(d):
    """vocab.json + merges.txt as in openai/clip-vit-large-patch14, made from the shipped .gz, written into d.
    `transformers.CLIPTokenizer.from_pretrained(d)` then loads without a network."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return d
