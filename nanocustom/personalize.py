"""Three ways to teach Stable Diffusion v1 a concept, behind one interface: a `Delta` attached to the model.

    "custom"    Custom Diffusion, Kumari et al. CVPR 2023 §3.1: fine-tune W^k, W^v of every cross-attention
    "svdiff"    SVDiff, Han et al. 2023 §3.2 Eq. 2: fine-tune spectral shifts, W = U diag(ReLU(sigma + delta)) V^T
    "residual"  Personalized residuals, Ham et al. CVPR 2024 §3.2: learn Delta W_i = A_i B_i on each proj_out

    delta = attach(sd, "custom", tokens=["<new1>"])   # wraps sd's modules in place; every base weight is frozen
    opt = torch.optim.AdamW(delta.trainable())        # param groups of only the trained tensors, papers' lrs
    ...                                               # train with "photo of a <new1> dog"
    save_delta(delta, "dog.safetensors")              # the delta alone, its metadata as JSON under "nanocustom"
    delta.fold()                                      # plain nn.Linear/Conv2d/Embedding again (or .detach())

Modifier tokens (`tokens=[...]`) work the same for all three: new vocabulary entries whose embedding rows start
as copies of rare tokens (Kumari et al. App. B "Choice of V*": 42170 "ktn", then 47629 "pll"; the authors'
scripts add 43514, "ucd") and live in a small table of their own, so an optimizer sees only the new rows. `<newK>`
starts from the K-th rare token in whichever run trains it (rare_tokens_for). A fourth token needs
init_from=[...]: like the authors' script we refuse to start two tokens from one rare token. Custom
Diffusion trains the rows (§3.1: V* is "optimized along with cross-attention parameters"). SVDiff and personalized
residuals use a rare identifier as it is (DreamBooth's recipe; Ham et al.'s 1.2M parameters are the residuals
alone), so there the rows stay frozen unless train_tokens=True.

`delta.layers` maps each wrapped module to the key prefix of its tensors in the delta, e.g.
"unet.middle_block.1.proj_out" -> its ResidualConv, whose tensors are "unet.middle_block.1.proj_out.A" and ".B".
"""
import copy
import dataclasses
import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from nanocustom.checkpoint import fingerprint, save_atomic, to_original_layout
from nanocustom.errors import NanocustomError
from nanocustom.unet import SpatialTransformer

RARE_TOKENS = [42170, 47629, 43514]  # "ktn", "pll", "ucd</w>": <new1> starts as 42170, <new2> as 47629, ...
SVD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanocustom" / "svd"


def rare_tokens_for(tokens):
    """The rare token each modifier token starts from: <newK> from the K-th, in a joint run and in a run of its own
    alike, and any other name from the first one no <newK> claims. The authors train each concept alone as <new1>
    from "ktn" and rename it at the merge; in the shapes model a row moves 2 to 3% of its length in training, so two
    concepts trained alone from one row came out as nearly one token (rows 0.19 apart, length 8.3), and their
    merge drew the first concept twice (JOURNAL.md, session 29)."""
    numbered = {t: int(t[4:-1]) for t in tokens if t.startswith("<new") and t.endswith(">") and t[4:-1].isdigit()}
    own = {t: RARE_TOKENS[k - 1] for t, k in numbered.items() if 1 <= k <= len(RARE_TOKENS)}
    free = iter([r for r in RARE_TOKENS if r not in own.values()])
    starts = []
    for t in tokens:
        start = own[t] if t in own else next(free, None)
        if start is None:
            break  # fewer rare tokens than modifier tokens: Delta refuses, asking for init_from
        starts.append(start)
    return starts


def check_free(sd):
    """One delta at a time: Delta.__init__ sets `sd.delta`, fold() and detach() clear it."""
    if getattr(sd, "delta", None) is not None:
        raise NanocustomError(f"a {sd.delta.method} delta is already attached to this model; "
                              "fold() or detach() it first")


def base_fingerprint(sd):
    """The id of the base weights a delta is made for: the checkpoint's own, else a hash of the weights."""
    if sd.fingerprint:
        return sd.fingerprint
    return "meta" if sd.device.type == "meta" else fingerprint(to_original_layout(sd))


class ModifierEmbedding(nn.Module):
    """The token embedding with modifier-token rows appended: the base table frozen, the new rows a Parameter of
    their own. fold() concatenates them back into one nn.Embedding."""

    def __init__(self, base, rows, trainable):
        super().__init__()
        self.base = base
        self.rows = nn.Parameter(rows, requires_grad=trainable)

    @property
    def weight(self):  # in the base table's dtype, also when the trained rows are kept in fp32
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, ids):
        n = self.base.num_embeddings
        new = ids >= n
        old_rows = self.base(ids.masked_fill(new, 0))
        new_rows = F.embedding((ids - n).clamp(min=0), self.rows).to(old_rows.dtype)
        return torch.where(new[..., None], new_rows, old_rows)  # gradient reaches only rows that were looked up


class Delta:
    """A personalization attached to a StableDiffusion `sd`: the base weights frozen, the delta's tensors trainable.

    Subclasses implement _wrap (attach; returns {key prefix: wrapped module}), _groups, _state_dict, _load_state_dict,
    _fold and _detach. After fold() or detach() the object is spent and `sd.delta` is None again."""
    method = ""
    train_tokens = False  # do the modifier-token rows train by default?
    unsaved_options = ()  # options that are not part of the delta (where a cache lives)

    def __init__(self, sd, tokens=(), init_from=None, train_tokens=None, **options):
        check_free(sd)
        wrap = inspect.signature(self._wrap).parameters
        unknown = [k for k in options if k not in wrap]
        if unknown:
            raise NanocustomError(f"{self.method} has no option {unknown[0]!r}; its options are: "
                                  + ", ".join(["tokens", "init_from", "train_tokens", *wrap]))
        self.sd, self.tokens = sd, list(tokens)
        init_from = rare_tokens_for(self.tokens) if init_from is None else init_from
        # The base's id stays sd's through fold(): later deltas made for the same base still load and compose
        # (residuals and spectral shifts add). A folded model saved and loaded again is a new base.
        self.base_fingerprint = sd.fingerprint = base_fingerprint(sd)
        train_tokens = self.train_tokens if train_tokens is None else bool(train_tokens)
        self.options = {"init_from": list(init_from), "train_tokens": train_tokens,
                        **{k: p.default for k, p in wrap.items()}, **options}
        self._requires_grad = [(p, p.requires_grad) for m in (sd.unet, sd.text_encoder, sd.vae) for p in m.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        self._tokenizer, self.embedding = sd.tokenizer, None
        try:  # each step checks its input before it changes anything
            self.embedding = self._add_tokens(self.tokens, init_from, train_tokens) if self.tokens else None
            self.layers = self._wrap(**options)
        except NanocustomError:
            self._remove_tokens()
            self._release()
            raise
        sd.delta = self
        for k in self.unsaved_options:
            self.options.pop(k, None)

    def _add_tokens(self, tokens, init_from, trainable):
        """Register the modifier tokens in a copy of the tokenizer (detach() puts the original back) and append
        their embedding rows, copied from the rare tokens `init_from` (Kumari et al. §3.1, App. B)."""
        tokenizer, embedding = copy.deepcopy(self.sd.tokenizer), self.sd.text_encoder.embeddings.token_embedding
        bad = [t for t in tokens if t != t.lower() or len(t.split()) != 1 or tokens.count(t) > 1]
        if bad:  # the tokenizer lowercases prompts, so "<New1>" would never be matched
            raise NanocustomError(f"modifier token {bad[0]!r} must be one lowercase word, given once, e.g. '<new1>'")
        if len(init_from) < len(tokens):  # as the authors' script: one rare token per modifier token, never reused
            raise NanocustomError(f"{len(tokens)} modifier tokens but {len(init_from)} rare tokens to start them from; "
                                  f"pass init_from=[...] with one token id or string per modifier token")
        n = embedding.num_embeddings
        for token in tokens:
            if token in tokenizer.backend.get_vocab():
                raise NanocustomError(f"{token!r} is already in the vocabulary; name the new concept's token "
                                      f"differently, e.g. '<new{len(tokenizer.added_tokens) + 1}>'")
        if tokenizer.add_tokens(tokens) != list(range(n, n + len(tokens))):
            raise NanocustomError(f"the tokenizer has {len(tokenizer)} ids but the text encoder {n} embedding rows; "
                                  "load the model with the tokenizer it was saved with")
        try:
            init_ids = [i if isinstance(i, int) else tokenizer.token_id(i) for i in init_from[:len(tokens)]]
        except KeyError as e:
            raise NanocustomError(f"init_from: {e.args[0]}; give ids, or single BPE pieces like 'ktn'") from None
        self.sd.tokenizer = tokenizer
        self.sd.text_encoder.embeddings.token_embedding = ModifierEmbedding(
            embedding, embedding.weight.detach()[init_ids].clone(), trainable)
        return self.sd.text_encoder.embeddings.token_embedding

    def trainable(self, lr=None):
        """Optimizer param groups holding only the trained tensors, each {"name", "params", "lr"} with the paper's
        learning rate; `lr` replaces the method's own (self.lr) and scales every group by the same factor."""
        groups = self._groups()
        if self.embedding is not None and self.embedding.rows.requires_grad:
            groups.append(("modifier_tokens", [self.embedding.rows], self.lr))
        groups = [g for g in groups if g[1]]
        factor = 1.0 if lr is None else lr / self.lr
        return [{"name": name, "params": params, "lr": group_lr * factor} for name, params, group_lr in groups]

    def state_dict(self):
        """A copy of the delta alone, as saved: the method's tensors (keys "unet.<module path>.<name>") and the
        token rows. Copies, so that snapshots taken during training stay as they were."""
        return {k: v.detach().clone() for k, v in self._tensors().items()}

    def _tensors(self):
        self._check_live()
        tensors = self._state_dict()
        if self.embedding is not None:
            tensors["modifier_tokens"] = self.embedding.rows  # [len(tokens), hidden], in the order of tokens
        return tensors

    def load_state_dict(self, tensors):
        expected = self._tensors()
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            problems = [f"{len(v)} {what} (e.g. {v[0]})"
                        for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
            raise NanocustomError(f"these tensors are not a {self.method} delta of this model: " + "; ".join(problems))
        with torch.no_grad():
            if self.embedding is not None:
                _copy(self.embedding.rows, tensors["modifier_tokens"], "modifier_tokens")
            self._load_state_dict({k: v for k, v in tensors.items() if k != "modifier_tokens"})

    def metadata(self):
        return {"method": self.method, "options": self.options, "tokens": self.tokens,
                "base_fingerprint": self.base_fingerprint}

    def fold(self):
        """Bake the delta into plain weights (nn.Linear/Conv2d/Embedding, the original key names) for sampling."""
        self._check_live()
        self._fold()
        if self.embedding is not None:
            weight = self.embedding.weight.detach()
            self.sd.text_encoder.embeddings.token_embedding = nn.Embedding.from_pretrained(weight, freeze=True)
            config = self.sd.text_encoder.config  # replaced, not changed: models may share a config object
            self.sd.text_encoder.config = dataclasses.replace(config, vocab_size=weight.shape[0])
        self._release()

    def detach(self):
        """Remove the delta: the base modules, weights and tokenizer exactly as they were."""
        self._check_live()
        self._detach()
        self._remove_tokens()
        self._release()

    def _remove_tokens(self):
        if self.embedding is not None:
            self.sd.text_encoder.embeddings.token_embedding = self.embedding.base
        self.sd.tokenizer = self._tokenizer

    def _release(self):
        for p, flag in self._requires_grad:  # the base parameters' flags as they were; folded weights are frozen
            p.requires_grad_(flag)
        self.sd.delta, self.sd = None, None

    def _check_live(self):
        if self.sd is None:
            raise NanocustomError(f"this {self.method} delta was folded or detached already; attach or load it again")


def _copy(param, value, key):
    if value.shape != param.shape:
        raise NanocustomError(f"{key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
    param.copy_(value)


# -----------------------------------------------------------------------------
# Custom Diffusion, Kumari et al. §3.1

def detach_start_token(module, inputs, output):
    """Forward hook on attn2's to_k / to_v: the start token's keys and values get no gradient, as in the authors'
    src/model.py (App. D: "We also detach the start token embedding"). BOS sees only itself through CLIP's causal
    mask, so its K and V are the same in every prompt: training them would shift every prompt alike."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)  # output [B, 77, inner]


class CustomDiffusion(Delta):
    """§3.1: "we propose to only update W^k and W^v" of the cross-attention layers, the only weights that read the
    text features (19.17M parameters in SD v1), together with the modifier tokens V*.

    The delta holds the fine-tuned weights W themselves, not W - W0, as the authors' delta.bin does: the merge
    (§3.2 Eq. 4-5, merge.py) and the compression (App. B) take W and W0, and W0 is the base model's own weight."""
    method = "custom"
    train_tokens = True
    lr = 8e-5  # §3.2 "Training details", App. D: 1e-5 scaled by the batch size 8; scale it to your batch

    def _wrap(self, train="kv"):
        names = {"kv": ("to_k", "to_v"), "attn2": ("to_q", "to_k", "to_v", "to_out.0")}  # "attn2": all of it
        if train not in names:
            raise NanocustomError(f"train={train!r}: choose 'kv' (the paper's W^k, W^v) or 'attn2' (q, k, v and out)")
        layers, self.originals, self.hooks = {}, {}, []
        for path, attn in self.sd.unet.named_modules():
            if path.endswith(".attn2"):  # the cross-attentions; attn1 is self-attention
                for name in names[train]:
                    key = f"unet.{path}.{name}"
                    linear = layers[key] = attn.get_submodule(name)
                    self.originals[key] = dict(linear.named_parameters())  # W0, untouched, for detach()
                    for pname, p in self.originals[key].items():
                        setattr(linear, pname, nn.Parameter(p.detach().clone()))  # W, trained, starts at W0
                self.hooks += [attn.to_k.register_forward_hook(detach_start_token),
                               attn.to_v.register_forward_hook(detach_start_token)]
        return layers

    def _groups(self):
        return [("cross_attention", [p for linear in self.layers.values() for p in linear.parameters()], self.lr)]

    def originals_by_key(self):
        """The base weights W0, keyed as in state_dict(): what the merge (merge.py) starts from."""
        return {f"{key}.{pname}": p.detach() for key, params in self.originals.items() for pname, p in params.items()}

    def _state_dict(self):
        return {f"{key}.{pname}": p for key, linear in self.layers.items() for pname, p in linear.named_parameters()}

    def _load_state_dict(self, tensors):
        for key, p in self._state_dict().items():
            _copy(p, tensors[key], key)

    def _fold(self):  # the trained W are plain nn.Linear weights already; back to the base dtype, if trained in fp32
        for hook in self.hooks:
            hook.remove()
        for key, linear in self.layers.items():
            linear.requires_grad_(False).to(self.originals[key]["weight"].dtype)

    def _detach(self):
        for hook in self.hooks:
            hook.remove()
        for key, linear in self.layers.items():
            for pname, p in self.originals[key].items():
                setattr(linear, pname, p)


# -----------------------------------------------------------------------------
# SVDiff, Han et al. §3.2

SUBSETS = {  # Table 1: which UNet weights get spectral shifts, by module path and the weight's dimensions
    "all": lambda path, ndim: True,  # "UNet" (UNet only: Table 1 fine-tunes "subsets of parameters in UNet")
    "cross_attn": lambda path, ndim: ".attn2." in path,  # "UNet-CA"
    "kv": lambda path, ndim: path.endswith((".attn2.to_k", ".attn2.to_v")),  # "UNet-CA-KV"
    "1d": lambda path, ndim: ndim == 1,  # "UNet-1D": the norms' scales
    "2d": lambda path, ndim: ndim == 2,  # "UNet-2D": linear layers
    "4d": lambda path, ndim: ndim == 4,  # "UNet-4D": convolutions
    "up": lambda path, ndim: path.startswith("output_blocks."),  # "Up-Blocks"
    "down": lambda path, ndim: path.startswith("input_blocks."),  # "Down-Blocks"
    "mid": lambda path, ndim: path.startswith("middle_block."),  # "Mid-Block"
    "up_cross_attn": lambda path, ndim: path.startswith("output_blocks.") and ".attn2." in path,  # "Up-CA"
    "down_cross_attn": lambda path, ndim: path.startswith("input_blocks.") and ".attn2." in path,  # "Down-CA"
    "mid_cross_attn": lambda path, ndim: path.startswith("middle_block.") and ".attn2." in path,  # "Mid-CA"
}


class SpectralShift(nn.Module):
    """Eq. 2 as a parametrization of a weight: W_delta = U diag(ReLU(sigma + delta)) V^T, conv kernels reshaped to
    c_out x (c_in k k) as in FSGAN (§3.1). Computed as W + U diag(ReLU(sigma + delta) - sigma) V^T, the same
    matrix since W = U diag(sigma) V^T, so that delta = 0 gives W exactly rather than its fp32 reconstruction
    (phymhan/SVDiff adds the reconstruction's residual for the same reason)."""

    def __init__(self, U, sigma, Vh):
        super().__init__()
        for name, t in (("U", U), ("sigma", sigma), ("Vh", Vh)):
            self.register_buffer(name, t, persistent=False)  # fixed, cached on disk, not part of the delta
        self.delta = nn.Parameter(torch.zeros_like(sigma))

    def forward(self, W):
        shift = F.relu(self.sigma + self.delta) - self.sigma  # Eq. 2: ReLU(sigma + delta), less sigma
        return W + ((self.U * shift) @ self.Vh).view(W.shape).to(W.dtype)  # U diag(shift) V^T: scales U's columns


class Shift(nn.Module):
    """1-D weights (norm scales) are not decomposed: they get an additive shift, with their own lr (App. A)."""

    def __init__(self, weight):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(weight.shape, device=weight.device, dtype=torch.float32))

    def forward(self, W):
        return W + self.delta.to(W.dtype)


class SVDiff(Delta):
    """§3.2: fine-tune only the singular values of each weight in the chosen subset, as spectral shifts delta.

    Biases are left out, as in Table 1 (its "UNet-1D", 430KB, is the norms' scales; with biases it would be
    1.8MB). text_encoder=True adds the text encoder's linear and norm weights: with them the delta is the
    introduction's "1.7MB for StableDiffusion"; the paper's experiments and Table 1 use the UNet alone."""
    method = "svdiff"
    lr, lr_1d = 1e-3, 1e-6  # App. A: spectral shifts 1e-3 ("1,000 times" full fine-tuning's); 1-D weights 1e-6
    unsaved_options = ("cache_dir",)

    def _wrap(self, subset="all", text_encoder=False, cache_dir=None):
        if subset not in SUBSETS:
            raise NanocustomError(f"subset={subset!r}: choose one of Table 1's: {', '.join(SUBSETS)}")
        targets = {f"unet.{path}": m for path, m in self.sd.unet.named_modules()
                   if isinstance(getattr(m, "weight", None), nn.Parameter) and SUBSETS[subset](path, m.weight.ndim)}
        if text_encoder:  # linear layers and norms; the embedding tables are lookups, not maps
            targets |= {f"text_encoder.{path}": m for path, m in self.sd.text_encoder.named_modules()
                        if isinstance(m, (nn.Linear, nn.LayerNorm))}
        name = subset + ("+text_encoder" if text_encoder else "")
        svd = self._svd({k: m.weight for k, m in targets.items() if m.weight.ndim > 1}, name, cache_dir)
        for key, m in targets.items():
            shift = SpectralShift(*svd[key]) if key in svd else Shift(m.weight)
            parametrize.register_parametrization(m, "weight", shift)  # m.weight is now shift(W), W kept frozen
        return targets

    def _svd(self, weights, name, cache_dir):
        """{key: (U, sigma, V^T)} in fp32 for each weight, reshaped to c_out x rest. §3.2: "the SVD is a one-time
        computation and can be cached": computed once per base model and subset, then read from disk."""
        def decompose(W):  # contiguous, as read back from the cache, so a first run computes as the later ones
            return tuple(t.contiguous() for t in torch.linalg.svd(W.detach().float().flatten(1), full_matrices=False))
        if self.sd.device.type == "meta":  # shapes only, e.g. to count parameters at SD v1 size
            return {k: decompose(W) for k, W in weights.items()}
        path = Path(cache_dir or SVD_CACHE).expanduser() / f"{self.base_fingerprint}-{name}.safetensors"
        if path.is_file():
            cached = load_file(path, device=str(self.sd.device))
            svd = {k: tuple(cached.get(f"{k}.{s}") for s in ("U", "sigma", "Vh")) for k in weights}
            if len(cached) == 3 * len(weights) and all(
                    U is not None and Vh is not None and U.shape[0] == W.shape[0] and Vh.shape[1] == W[0].numel()
                    for (U, _, Vh), W in zip(svd.values(), weights.values())):
                return svd
        svd = {k: decompose(W) for k, W in weights.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({f"{k}.{name}": t.cpu()
                     for k, usv in svd.items() for name, t in zip(("U", "sigma", "Vh"), usv)}, path)
        return svd

    def shifts(self):
        return {key: m.parametrizations.weight[0] for key, m in self.layers.items()}

    def _groups(self):
        shifts = self.shifts().values()
        return [("spectral_shifts", [s.delta for s in shifts if isinstance(s, SpectralShift)], self.lr),
                ("1d_shifts", [s.delta for s in shifts if isinstance(s, Shift)], self.lr_1d)]

    def _state_dict(self):
        return {f"{key}.delta": s.delta for key, s in self.shifts().items()}

    def _load_state_dict(self, tensors):
        for key, s in self.shifts().items():
            _copy(s.delta, tensors[f"{key}.delta"], f"{key}.delta")

    def _fold(self):
        for m in self.layers.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)  # W_delta into W's Parameter

    def _detach(self):
        for m in self.layers.values():
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def _check_combinable(deltas, suffixes):
    """The deltas must hold the same keys; tensors not ending in suffixes (frozen token rows) must be equal.
    Returns those shared tensors."""
    if any(set(d) != set(deltas[0]) for d in deltas):
        raise NanocustomError("the deltas hold different tensors: combine deltas of the same method and subset")
    shared = {k: v for k, v in deltas[0].items() if not k.endswith(suffixes)}
    for key, value in shared.items():
        if not all(torch.equal(d[key], value) for d in deltas):
            raise NanocustomError(f"{key} differs between the deltas; combine deltas whose modifier tokens are "
                                  "the same frozen rows, or that have none")
    return shared


def _linear(deltas, coefficients):
    """sum_k c_k delta_k for every spectral shift (1-D shifts alike)."""
    out = _check_combinable(deltas, (".delta",))
    for key in deltas[0]:
        if key.endswith(".delta"):
            out[key] = sum(c * d[key] for c, d in zip(coefficients, deltas))
    return out


def svdiff_combine(a, b):
    """Eq. 4: Sigma_delta' = diag(ReLU(sigma + delta_1 + delta_2)), i.e. delta' = delta_1 + delta_2."""
    return _linear([a, b], [1.0, 1.0])


def svdiff_interpolate(a, b, alpha):
    """Eq. 5: delta' = alpha delta_1 + (1 - alpha) delta_2, 0 <= alpha <= 1."""
    return _linear([a, b], [alpha, 1.0 - alpha])


def svdiff_scale(a, s):
    """App. E.3 (Fig. 25): Sigma_delta' = diag(ReLU(sigma + s delta)); s = 2 is already too strong."""
    return _linear([a], [s])


# -----------------------------------------------------------------------------
# Personalized residuals, Ham et al. §3.2

class ResidualConv(nn.Module):
    """A transformer's 1x1 proj_out with a low-rank residual, Delta W = A B, A [m, r], B [r, m].

    Computes both f = W x + b and f' = (W + A B) x + b and returns (1 - M) ⊙ f + M ⊙ f' (§3.3 Eq. 3), where
    `mask` M is, at forward time:
      None      M = 1: f' everywhere (training, ordinary sampling);
      a tensor  broadcastable to the output [B, m, H, W], e.g. [B, 1, H, W] of 0/1;
      callable  mask(self) -> tensor or None, called during the forward: LAG sampling sets one per layer that
                returns the binarised attention map it recorded in this block's attn2 earlier in the same UNet
                pass (`self.name` says which block), so LAG costs no extra UNet evaluation.
    `branch`, when not None, [B, 1, 1, 1] of 0/1, multiplies M per batch row: 0 on the unconditional half of a
    guided batch gives that half the base model's prediction (pipeline.generate's base_unconditional).
    """

    def __init__(self, base, rank, name):
        super().__init__()
        self.base, self.name, self.mask, self.branch = base, name, None, None
        m, n, kw = base.out_channels, base.in_channels, dict(device=base.weight.device, dtype=base.weight.dtype)
        # §4.1 says only "each of the low-rank matrices are randomly initialized". We start the output side A at
        # zero and B random, as LoRA does (Hu et al.; cloneofsimo/lora: "up" zero, "down" N(0, 1/r)): Delta W = 0,
        # so training starts from the base model and LAG's f' = f at first; A gets gradient at once
        # (dL/dA = G (B x)^T), B from the second step. Both random would start from a perturbed model.
        self.A = nn.Parameter(torch.zeros(m, rank, **kw))
        self.B = nn.Parameter(torch.randn(rank, n, **kw) / rank)

    def residual(self, x):
        """Delta W x, through the rank-r bottleneck (2 m r multiply-adds per pixel, not m^2)."""
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)  # A, B may be kept in fp32 beside a half model
        return F.conv2d(F.conv2d(x, B[:, :, None, None]), A[:, :, None, None])

    def outputs(self, x):
        """(f, f'): the base and the personalised features of Eq. 3."""
        f = self.base(x)
        return f, f + self.residual(x)

    def forward(self, x):
        f, r = self.base(x), self.residual(x)
        M = self.mask(self) if callable(self.mask) else self.mask
        if self.branch is not None:
            M = self.branch if M is None else M * self.branch
        return f + r if M is None else f + M.to(r.dtype) * r  # Eq. 3: (1 - M) ⊙ f + M ⊙ f' = f + M ⊙ (f' - f)


class PersonalizedResiduals(Delta):
    """§3.2: for every transformer block i, learn Delta W_i = A_i B_i for its output projection W_i (m_i x m_i x 1),
    rank r_i = 0.05 m_i (§4.1: 1.2M parameters in SD v1). The base model is untouched, so no regularization images."""
    method = "residual"
    lr = 1e-3  # §4.1: 150 iterations, batch size 4, learning rate 1.0e-3

    def _wrap(self, rank_fraction=0.05):
        if not 0 < rank_fraction <= 1:
            raise NanocustomError(f"rank_fraction={rank_fraction}: must be in (0, 1]; the paper uses 0.05")
        layers = {}
        for path, block in list(self.sd.unet.named_modules()):
            if isinstance(block, SpatialTransformer):
                rank = max(1, round(rank_fraction * block.proj_out.out_channels))  # r_i = 0.05 m_i, at least 1
                layer = ResidualConv(block.proj_out, rank, name=f"{path}.proj_out")
                block.proj_out = layers[f"unet.{path}.proj_out"] = layer
        return layers

    def _groups(self):
        return [("residuals", [p for layer in self.layers.values() for p in (layer.A, layer.B)], self.lr)]

    def _state_dict(self):
        return {f"{key}.{name}": getattr(layer, name) for key, layer in self.layers.items() for name in "AB"}

    def _load_state_dict(self, tensors):
        """Copies into A and B; a different rank (residual_sum gives sum_k r_k) replaces them, so an optimizer
        built before would no longer see them."""
        for key, layer in self.layers.items():
            A, B = tensors[f"{key}.A"], tensors[f"{key}.B"]
            m, n = layer.base.out_channels, layer.base.in_channels
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != m or B.shape[1] != n or A.shape[1] != B.shape[0]:
                raise NanocustomError(f"{key}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [{m}, r] and [r, {n}]")
            if A.shape == layer.A.shape:
                layer.A.copy_(A)
                layer.B.copy_(B)
            else:
                kw = dict(device=layer.A.device, dtype=layer.A.dtype)
                layer.A, layer.B = nn.Parameter(A.to(**kw).clone()), nn.Parameter(B.to(**kw).clone())

    def _fold(self):
        for layer in self.layers.values():
            conv = layer.base
            with torch.no_grad():  # W' = W + Delta W (§3.2), a new Parameter: W itself is not changed
                delta_W = (layer.A @ layer.B).view_as(conv.weight).to(conv.weight.dtype)
                conv.weight = nn.Parameter(conv.weight + delta_W, requires_grad=False)
            self.sd.unet.set_submodule(layer.name, conv)

    def _detach(self):
        for layer in self.layers.values():
            self.sd.unet.set_submodule(layer.name, layer.base)


def residual_sum(deltas, scales=None):
    """sum_k s_k A_k B_k per layer, exactly, as one residual of rank sum_k r_k: A = [s_1 A_1, s_2 A_2, ...],
    B = [B_1; B_2; ...]. Residuals of different concepts add as weight deltas, W' = W + sum_k s_k Delta W_k."""
    scales = [1.0] * len(deltas) if scales is None else list(scales)
    if len(scales) != len(deltas):
        raise NanocustomError(f"{len(deltas)} deltas but {len(scales)} scales; give one scale per delta")
    out = _check_combinable(deltas, (".A", ".B"))
    for key in deltas[0]:
        if key.endswith(".A"):
            out[key] = torch.cat([s * d[key] for s, d in zip(scales, deltas)], dim=1)
        elif key.endswith(".B"):
            out[key] = torch.cat([d[key] for d in deltas], dim=0)
    return out


# -----------------------------------------------------------------------------
# attach, save, load

METHODS = {"custom": CustomDiffusion, "svdiff": SVDiff, "residual": PersonalizedResiduals}


def attach(sd, method, tokens=(), **options):
    """Attach a new, untrained delta of `method` to sd (in place); options as the method's _wrap takes them."""
    if method not in METHODS:
        raise NanocustomError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](sd, tokens, **options)


def parameter_count(delta):
    return sum(p.numel() for group in delta.trainable() for p in group["params"])


def save_delta(delta, path, extra_metadata=None, keep=None):
    """Write the delta alone as safetensors, atomically; its metadata() (+ extra) as JSON under "nanocustom".

    keep (Custom Diffusion only): store each fine-tuned K/V matrix in low rank, Kumari et al. App. B, as the
    factors "<key>.US" and "<key>.Vt" of W - W0 that keep the fraction `keep` of the sum of its singular values
    (merge.compress_custom_delta); the metadata says {"compression": {"keep": keep, ...}}. load_delta and
    merge.combine multiply them out against the base weights, so the file needs the base model it was made for."""
    metadata = {**delta.metadata(), **(extra_metadata or {})}
    if keep is None:
        tensors = delta.state_dict()
    else:
        from nanocustom.merge import compress_custom_delta
        tensors, _ = compress_custom_delta(delta, keep)
        metadata["compression"] = {"keep": keep, "layout": "<key>.US @ <key>.Vt = W - W0 (Kumari et al. App. B)"}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    save_atomic(tensors, path, metadata={"nanocustom": json.dumps(metadata)})


def read_delta_metadata(path):
    """The metadata save_delta wrote: method, options, tokens, base_fingerprint, and any extra_metadata."""
    path = Path(path)
    if not path.is_file():
        raise NanocustomError(f"delta not found: {path}; pass the .safetensors file save_delta wrote")
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["nanocustom"])
        if info["method"] not in METHODS:
            raise KeyError(info["method"])
    except Exception as e:
        raise NanocustomError(f"{path.name} is not a nanocustom delta ({type(e).__name__}); "
                              "pass a file save_delta wrote") from None
    return info


def delta_method(path):
    return read_delta_metadata(path)["method"]


def read_delta_tensors(sd, path, info=None, device=None):
    """The tensors of a delta file, as Delta.load_state_dict takes them. A compressed Custom Diffusion file
    (save_delta's keep=) holds W - W0 in low rank: its W = W0 + (U S) V^T are formed here from sd's base weights W0,
    so sd must be the base model with no delta attached."""
    info = read_delta_metadata(path) if info is None else info
    try:
        tensors = load_file(str(path), device=str(device or (sd.device if sd is not None else "cpu")))
    except Exception as e:
        raise NanocustomError(f"cannot read {Path(path).name} ({type(e).__name__}): truncated or not a delta; "
                              "write it again with save_delta") from None
    if "compression" not in info:
        return tensors
    if sd is None:
        raise NanocustomError(f"{Path(path).name} stores Custom Diffusion's W - W0 in low rank (Kumari et al. App. B) "
                              "and needs its base model to multiply out; pass the base model (sd=...)")
    check_free(sd)
    from nanocustom.merge import decompress_custom_tensors
    W0s = {}
    for key in (k.removesuffix(".US") for k in tensors if k.endswith(".US")):
        try:
            W0s[key] = sd.unet.get_parameter(key.removeprefix("unet.")).detach()
        except AttributeError:
            raise NanocustomError(f"{Path(path).name}: {key} is not a weight of this model's UNet; load the base "
                                  "model the delta was made for") from None
    return decompress_custom_tensors(tensors, W0s)


def check_made_for(sd, path, info, force, way_out="load the base it was trained on, or pass force=True to apply it "
                   "anyway"):
    """A delta is refused on base weights other than those it was trained on, unless forced."""
    made_for, this = info.get("base_fingerprint"), base_fingerprint(sd)
    if made_for != this and not force:
        raise NanocustomError(f"{Path(path).name} was made for base model {made_for}, not this one ({this}); {way_out}")


def load_delta(sd, path, force=False, **options):
    """Attach the delta saved at path to sd. Refuses one made for other base weights unless force=True.
    options (e.g. cache_dir) are passed to attach, over the saved ones."""
    info = read_delta_metadata(path)
    check_free(sd)
    check_made_for(sd, path, info, force)
    tensors = read_delta_tensors(sd, path, info)  # before attach: a compressed file needs the base weights W0
    delta = attach(sd, info["method"], tokens=info.get("tokens", []), **{**info.get("options", {}), **options})
    delta.load_state_dict(tensors)
    return delta
