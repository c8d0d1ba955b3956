"""Shared by the tests: the reference CLIP tokenizer files, made offline from the merges file we ship, and random
weights for parity tests."""
import gzip
import json

import torch
import torch.nn as nn

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


def randomize_(model, seed=0):
    """Every tensor random (zero-initialised layers would hide bugs): weights ~ N(0, 1/fan_in), norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    norms = {name for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            module, kind = name.rsplit(".", 1)
            noise = torch.randn(p.shape, generator=g)
            if module in norms and kind == "weight":
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
    return model.eval()
