"""
CLIP's byte-level BPE tokenizer, as Stable Diffusion v1 uses it (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", Sec. 2.4: "lower-cased byte pair encoding (BPE) representation
of the text with a 49,152 vocab size", bracketed with [SOS] and [EOS]).

The vocabulary is built from OpenAI's merges file the way their `simple_tokenizer.py` builds it, and the text goes
through the same steps as transformers' `CLIPTokenizer`, so the ids match the ones SD v1 was trained with:

    text -> NFC, collapse whitespace, lowercase           (normalizer)
         -> split with CLIP's regex, bytes -> unicode      (pre-tokenizer)
         -> BPE merges, "</w>" marks the end of a word     (model)
         -> <|startoftext|> ids <|endoftext|>, cut to 77, pad with <|endoftext|>   (encode, below)

    >>> tok = Tokenizer()
    >>> tok.tokenize("a photo of a dog")
    ['a</w>', 'photo</w>', 'of</w>', 'a</w>', 'dog</w>']
    >>> tok.encode("a photo of a dog")[0, :8].tolist()
    [49406, 320, 1125, 539, 320, 1929, 49407, 49407]
"""

import gzip
import warnings
from pathlib import Path

import torch
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48,894, as OpenAI counts: 256 bytes + 256 bytes</w> + merges + 2 specials = 49,408 ids
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP's text context: BOS + 75 tokens + EOS
# OpenAI's pattern, verbatim: the two special tokens, English contractions, runs of letters, single digits,
# runs of anything else that is not whitespace. Whitespace itself matches nothing and is dropped.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """The 256 bytes as 256 printable characters (GPT-2's table): printable Latin-1 bytes stand for themselves,
    the rest (controls, space, soft hyphen, ...) become chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}  # this order = ids 0..255


class Tokenizer:
    """CLIP BPE: `encode(prompts)` gives the (B, 77) LongTensor the text encoder takes."""

    def __init__(self, bpe_path=BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1 : N_MERGES + 1]]  # line 0 is the version line
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        vocab = {token: i for i, token in enumerate(vocab)}

        tok = HFTokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False))
        # OpenAI: ftfy.fix_text (which ends in NFC), whitespace_clean, .lower(). transformers keeps only the NFC part
        # of ftfy; we do as transformers does (see tests/test_tokenizer.py for what that changes).
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
        )
        # invert=True: the regex matches are the pieces, the gaps between them (whitespace) are removed.
        # ByteLevel maps bytes to symbols and splits again with GPT-2's regex. That second split changes only the
        # special-token pieces the added-token match missed: "<|ENDOFTEXT|>" lowercased goes "<|", "endoftext", "|>".
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Registered as special (matched in the raw text, never split), as OpenAI's cache and transformers do.
        tok.add_special_tokens([BOS, EOS])
        self.backend = tok
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]  # 49406, 49407

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    def add_tokens(self, tokens):
        """Add whole, never-split tokens (Custom Diffusion's "<new1>"), matched in the normalized (lowercased) text
        like transformers' `tokenizer.add_tokens`. New ones get the next ids; one already there keeps its id."""
        if isinstance(tokens, str):
            tokens = [tokens]
        self.backend.add_tokens(tokens)
        return [self.token_id(t) for t in tokens]

    @property
    def added_tokens(self):
        """The modifier tokens added with `add_tokens`, in id order."""
        return [t for t, i in sorted(self.backend.get_vocab().items(), key=lambda item: item[1]) if i > self.eos_id]

    def tokenize(self, text):
        """The BPE pieces of `text` as vocabulary strings (bytes shown as their symbols: "é" reads "Ã©")."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode(self, prompts):
        """list of B prompts (or one str) -> (B, 77) LongTensor: BOS, at most 75 ids, EOS, then EOS as padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = CONTEXT_LENGTH - 2
        rows = []
        for prompt, enc in zip(prompts, self.backend.encode_batch(prompts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > n:
                warnings.warn(
                    f"CLIP takes {n} tokens; the prompt {prompt[:40]!r}... has {len(ids)}, so "
                    f"{len(ids) - n} were cut: {self.decode(ids[n:])!r}"
                )
                ids = ids[:n]
            rows.append([self.bos_id] + ids + [self.eos_id] * (n + 1 - len(ids)))  # SD v1 pads with EOS, not 0
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids, skip_special_tokens=True):
        """ids (list or 1-D tensor) -> text, lowercased and with single spaces between words. BOS, EOS and padding
        are dropped unless skip_special_tokens=False."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()
