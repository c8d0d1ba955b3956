"""Merging fine-tuned cross-attention weights, Custom Diffusion (Kumari et al., CVPR 2023).

Two concepts fine-tuned apart give two sets of cross-attention key/value projections. §3.2
("Multiple-concept compositional fine-tuning") merges them into one by a constrained least-squares
problem per matrix, Eq. 4, solved in closed form by Lagrange multipliers, Eq. 5, derived in
Appendix A, Eq. 6-9. Appendix B ("Model compression") stores each fine-tuned delta in low rank.

Symbols as in the paper (the paper's feature width d is written `dim` here, as `d` is also Eq. 5's
matrix):
    W0     [o, dim]      a pretrained key or value projection (attn2.to_k / attn2.to_v of one layer)
    C      [s, dim]      text features of the s target-caption tokens of all N concepts
    V      [o, s]        their targets: column i is W_n c_i for the fine-tuned W_n of c_i's concept
    C_reg  [s_reg, dim]  text features of the regularization captions (~1000 captions in the paper)
    d      [s, dim]      C (C_reg^T C_reg)^-1, Eq. 5

This part is matrix-level. All the linear algebra runs in float64 by factorisation (Cholesky of
C_reg^T C_reg and of d C^T, never an explicit inverse) and returns the input's dtype. Whatever
depends only on C_reg (`RegularizerGram`) or on C and C_reg (`MergeSolver`) is factorised once and
reused for all 32 K/V matrices of SD v1 (16 cross-attention layers x K and V).

Where Eq. 5's assumptions fail, each fallback warns and returns finite weights:
  - rank(C_reg) < dim: ridge on the Gram matrix (`RegularizerGram`);
  - dependent constraint rows (d C^T singular): pseudo-inverse solution, which still satisfies the
    constraints exactly when they are consistent (`MergeSolver`);
  - inconsistent constraints (no W satisfies W C^T = V): the same pseudo-inverse solution is their
    least-squares fit; the warning gives the residual.
"""
import warnings
from pathlib import Path

import torch

from nanocustom.errors import NanocustomError

RIDGE = 1e-6  # ridge for a rank-deficient C_reg^T C_reg, as a fraction of its mean eigenvalue trace/dim
EPS = torch.finfo(torch.float64).eps


def _inexact_tol(dtype):
    """Relative residual above which the targets of a constraint set are called inconsistent.

    sqrt(eps) of the dtype they came in: half its digits, so float32 targets rounded from the same
    W_n c_i are not reported, while genuinely different targets are.
    """
    return torch.finfo(dtype).eps ** 0.5


# -----------------------------------------------------------------------------
# Closed-form merge, §3.2 Eq. 4-5 and Appendix A Eq. 6-9

class RegularizerGram:
    """C_reg^T C_reg and its Cholesky factor, computed once per regularization set.

    Forming the Gram matrix (s_reg x dim x dim multiply-adds) is the most expensive step of the
    merge; it depends on neither the concepts nor the layer, so one serves every matrix and any C.
    """

    def __init__(self, C_reg, rel_ridge=RIDGE):
        C_reg = C_reg.to(torch.float64)
        s_reg, dim = C_reg.shape
        G = C_reg.T @ C_reg  # Eq. 8: C_reg^T C_reg, [dim, dim]
        lam = torch.linalg.eigvalsh(G)  # ascending
        self.rank = int((lam > dim * EPS * lam[-1]).sum())  # torch.linalg.matrix_rank's tolerance
        self.ridge = 0.0  # added to G's diagonal, in G's units
        L, info = torch.linalg.cholesky_ex(G)
        if self.rank < dim or info > 0:
            # Fallback. Eq. 5 assumes "C_reg is non-degenerate" (App. A, above Eq. 9). With
            # rank(C_reg) < dim the objective of Eq. 4 ignores W's action outside C_reg's row space,
            # so the minimiser is not unique. Adding ridge * I to the Gram matrix adds
            # ridge * ||W - W0||_F^2 to the objective: among the minimisers it picks (as ridge -> 0)
            # the one that moves W0 least. Scaled to G's mean eigenvalue, it is unit-free.
            mean_eig = float(G.trace()) / dim
            self.ridge = rel_ridge * (mean_eig if mean_eig > 0 else 1.0)
            warnings.warn(f"C_reg^T C_reg is singular (C_reg has rank {self.rank} of dim {dim}, {s_reg} rows) and Eq. 5 "
                          f"needs it invertible; adding a ridge of {rel_ridge:g} x trace/dim = {self.ridge:.3g} "
                          f"(the merge then moves W0 least outside C_reg's span)")
            G = G + self.ridge * torch.eye(dim, dtype=G.dtype, device=G.device)
            L = torch.linalg.cholesky(G)
        self.L, self.dim = L, dim  # G = L L^T


class MergeSolver:
    """Eq. 5 for one constraint set C: factorise once, then merge each (W0, V) pair cheaply.

    solver = MergeSolver(C, C_reg)        # or MergeSolver(C, gram=RegularizerGram(C_reg))
    W = solver.solve(W0, V)               # for each of the 32 K/V matrices
    """

    def __init__(self, C, C_reg=None, gram=None):
        if (C_reg is None) == (gram is None):
            raise NanocustomError("pass exactly one of C_reg (a [s_reg, dim] tensor) or gram (a RegularizerGram)")
        gram = RegularizerGram(C_reg) if gram is None else gram
        C = C.to(torch.float64)
        if C.ndim != 2 or C.shape[1] != gram.dim:
            raise NanocustomError(f"C must be [s, {gram.dim}] to match C_reg, got {list(C.shape)}")
        self.gram, self.C_all = gram, C

        # Exactly repeated rows of C (a token with the same features in two captions, as composenW.py
        # finds) are one constraint: drop the copies here, and fit the mean of their targets in solve().
        # Near-duplicates are left to the rank test on d C^T below: a row tolerance would decide which of
        # two different targets wins, a modelling choice rather than a numerical one.
        self.C, self.group = torch.unique(C, dim=0, return_inverse=True)  # group: row of C -> row of self.C
        s = self.C.shape[0]

        # Eq. 9's d and d C^T through the Cholesky factor L of G = C_reg^T C_reg = L L^T. With A = L^-1 C^T,
        #   d^T = G^-1 C^T = L^-T A   and   d C^T = C L^-T L^-1 C^T = A^T A:
        # the same matrices, with d C^T formed as a Gram matrix, so it is symmetric positive semi-definite
        # by construction and singular exactly as far as the rows of C are dependent, up to rounding.
        A = torch.linalg.solve_triangular(gram.L, self.C.T, upper=False)  # [dim, s]
        self.d = torch.linalg.solve_triangular(gram.L.T, A, upper=True).T  # Eq. 5/9: d = C (C_reg^T C_reg)^-1
        dCT = A.T @ A  # Eq. 9: d C^T, [s, s]
        # Rank of d C^T: eigenvalues below the rounding of its length-dim dot products, dim * eps of the
        # largest, count as zero. For the columns of A that is a dependency to within sqrt(dim * eps) ~ 4e-7
        # of the largest (SD's dim = 768), a few float32 roundings: near-duplicates at the precision the
        # features come in are merged, anything further apart is honoured as Eq. 4 asks.
        self.rtol = gram.dim * EPS
        lam = torch.linalg.eigvalsh(dCT)  # ascending
        self.rank = int((lam > self.rtol * lam[-1]).sum()) if s > 0 else 0
        L, info = torch.linalg.cholesky_ex(dCT)
        if self.rank == s and info == 0:
            self.L_dCT, self.dCT_pinv = L, None  # d C^T = L_dCT L_dCT^T
        else:
            # Fallback. Linearly dependent rows of C make d C^T singular and (d C^T)^-1 of Eq. 9 undefined.
            # Writing G = L L^T, Eq. 4 is min ||(W - W0) L|| s.t. (W - W0) L (L^-1 C^T) = V - W0 C^T, whose
            # minimum-norm least-squares solution is W = W0 + (V - W0 C^T) (d C^T)^+ d: Eq. 9 with the
            # pseudo-inverse. It satisfies consistent constraints exactly and fits inconsistent ones in
            # least squares (||W C^T - V||_F smallest), then minimises Eq. 4's objective.
            self.L_dCT, self.dCT_pinv = None, torch.linalg.pinv(dCT, hermitian=True, rtol=self.rtol)
            warnings.warn(f"d C^T is singular (rank {self.rank} of {s} constraints after removing "
                          f"{C.shape[0] - s} duplicate rows): the rows of C are linearly dependent; "
                          f"using the pseudo-inverse (least-squares) solution of Eq. 9")

    def solve(self, W0, V):
        """W = argmin ||W C_reg^T - W0 C_reg^T||_F s.t. W C^T = V (Eq. 4, restated as Eq. 6), in W0's dtype."""
        o, dim = W0.shape
        if dim != self.gram.dim or V.shape != (o, self.C_all.shape[0]):
            raise NanocustomError(f"W0 must be [o, {self.gram.dim}] and V [o, {self.C_all.shape[0]}], "
                             f"got W0 {list(W0.shape)} and V {list(V.shape)}")
        dtype, tol = W0.dtype, _inexact_tol(V.dtype)
        W0, V_all = W0.to(torch.float64), V.to(torch.float64)
        V = self._merge_duplicate_targets(V_all, tol)

        R = V - W0 @ self.C.T  # Eq. 9: V - W0 C^T, [o, s]
        if self.dCT_pinv is None:
            # Eq. 9: the Lagrange multipliers of Eq. 7, v^T = (V - W0 C^T)(d C^T)^-1 (d C^T symmetric)
            vT = torch.cholesky_solve(R.T, self.L_dCT).T  # [o, s]
        else:
            vT = R @ self.dCT_pinv  # fallback (see __init__): (d C^T)^+ in place of (d C^T)^-1
        W = W0 + vT @ self.d  # Eq. 5, from Eq. 8 (Eq. 7's gradient = 0): W = W0 + v^T d

        if self.dCT_pinv is not None:
            residual = float(torch.linalg.norm(W @ self.C_all.T - V_all) / torch.linalg.norm(V_all).clamp_min(EPS))
            if residual > tol:
                warnings.warn(f"inconsistent constraints: no W satisfies W C^T = V; returning the least-squares "
                              f"fit, relative residual ||W C^T - V||/||V|| = {residual:.3g}")
        return W.to(dtype)

    def constraint_residual(self, W, V):
        """||W C^T - V||_F / ||V||_F over the constraints solve() imposes: each repeated row of C once, with
        the mean of its targets (a merge that meets them exactly gives rounding, however far the copies'
        own targets lie apart)."""
        W, V = W.to(torch.float64), self.unique_targets(V.to(torch.float64))
        return float(torch.linalg.norm(W @ self.C.T - V) / torch.linalg.norm(V).clamp_min(EPS))

    def unique_targets(self, V):
        """V's columns for the unique rows of C: the mean over each group of repeated rows.

        The mean is the least-squares fit of W c = V_i for all copies i; it is their common value when
        they agree. (composenW.py keeps the first copy's target instead.)
        """
        s = self.C.shape[0]  # (torch.unique sorts, so this also puts V's columns in self.C's order)
        counts = torch.bincount(self.group, minlength=s).to(V.dtype)
        return torch.zeros(V.shape[0], s, dtype=V.dtype, device=V.device).index_add_(1, self.group, V) / counts

    def _merge_duplicate_targets(self, V, tol):
        """unique_targets(V), with a warning where the copies' targets differ."""
        V_mean = self.unique_targets(V)
        spread = float(torch.linalg.norm(V - V_mean[:, self.group]) / torch.linalg.norm(V).clamp_min(EPS))
        if spread > tol:
            warnings.warn(f"inconsistent constraints: repeated rows of C have different targets in V (relative "
                          f"spread {spread:.3g}); fitting their mean in least squares")
        return V_mean


def lagrangian_merge(W0, C, V, C_reg=None, gram=None):
    """One-shot Eq. 5: argmin_W ||W C_reg^T - W0 C_reg^T||_F s.t. W C^T = V, in W0's dtype.

    W0 [o, dim], C [s, dim], V [o, s], C_reg [s_reg, dim]; or, instead of C_reg, a precomputed
    gram=RegularizerGram(C_reg). For many matrices with the same C, build one MergeSolver.
    """
    return MergeSolver(C, C_reg, gram).solve(W0, V)


# -----------------------------------------------------------------------------
# Low-rank compression, Appendix B

def compress_delta(W, W0, keep):
    """Appendix B: ΔW = W - W0 as U S (top singular values) and V^T, in W's dtype.

    The SVD runs in float32, or float64 for float64 input: the delta is known no better than that,
    and float64 would double the time of 32 SVDs of up to 1280 x 768 for no change in the rank.

    Keeps the fewest top singular values whose cumulative sum reaches the fraction `keep` of their
    total: "singular values till the rank where cumulative sum is k% of total sum of singular
    values" (App. B). Sums of s, not s^2, as in the authors' src/compress.py. That loop stops one
    value earlier (it keeps those strictly before the one that crosses the ratio, so ratio 1 drops
    the last one and one dominant value gives rank 0); here keep = 1 keeps them all.
    """
    if not 0 < keep <= 1:  # also rejects nan
        raise NanocustomError(f"keep must be in (0, 1], the fraction of the sum of singular values to keep; got {keep}")
    if W.shape != W0.shape:
        raise NanocustomError(f"W and W0 must have the same shape, got {list(W.shape)} and {list(W0.shape)}")
    dtype = torch.promote_types(W.dtype, torch.float32)
    delta = W.to(dtype) - W0.to(dtype)
    U, S, Vt = torch.linalg.svd(delta, full_matrices=False)  # S descending
    total = S.sum()
    if total == 0:
        rank = 0  # W == W0: nothing to store
    else:
        reached = S.cumsum(0) / total  # fraction of the sum kept by the top 1, 2, ... values
        rank = min(int((reached < keep).sum()) + 1, S.numel())
    US = U[:, :rank] * S[:rank]  # U diag(S), [o, rank]
    return US.to(W.dtype), Vt[:rank].to(W.dtype)


def decompress_delta(US, Vt, W0):
    """W = W0 + (U S) V^T, in W0's dtype."""
    return (W0.to(torch.float64) + US.to(torch.float64) @ Vt.to(torch.float64)).to(W0.dtype)


def delta_storage(W0, US, Vt):
    """Storage of one delta: full (a dense [o, dim] matrix in W0's dtype) and low rank (U S and V^T)."""
    full_params, low_params = W0.numel(), US.numel() + Vt.numel()
    return {
        "full_params": full_params,
        "low_rank_params": low_params,
        "full_bytes": full_params * W0.element_size(),
        "low_rank_bytes": US.numel() * US.element_size() + Vt.numel() * Vt.element_size(),
        "ratio": full_params / low_params if low_params else float("inf"),
    }


def compress_custom_delta(delta, keep):
    """Appendix B for a whole Custom Diffusion delta: every fine-tuned weight matrix W as the low-rank factors of
    W - W0, "<key>.US" and "<key>.Vt" (compress_delta); biases and modifier-token rows as they are. This is the
    file layout of personalize.save_delta(..., keep=). Returns (tensors, stats): stats holds the bytes of the full
    and the compressed delta and the relative error ||W_k - W||_F / ||W - W0||_F over all compressed matrices."""
    if delta.method != "custom":
        raise NanocustomError(f"low-rank compression (Kumari et al. App. B) is for Custom Diffusion deltas, not "
                              f"{delta.method}: SVDiff's spectral shifts and personalized residuals are small and "
                              "low-rank already")
    W0s, tensors = delta.originals_by_key(), {}
    full_bytes, err2, delta2 = 0, 0.0, 0.0
    for key, W in delta.state_dict().items():
        full_bytes += W.numel() * W.element_size()
        if key not in W0s or W.ndim != 2:
            tensors[key] = W
            continue
        W0 = W0s[key]
        US, Vt = compress_delta(W, W0, keep)
        tensors[f"{key}.US"], tensors[f"{key}.Vt"] = US, Vt
        change = W.double() - W0.double()
        err2 += float((US.double() @ Vt.double() - change).square().sum())
        delta2 += float(change.square().sum())
    low_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, {"full_bytes": full_bytes, "low_rank_bytes": low_bytes,
                     "rel_error": (err2 / delta2) ** 0.5 if delta2 > 0 else 0.0}


def decompress_custom_tensors(tensors, W0s):
    """The inverse of compress_custom_delta: W = W0 + (U S) V^T for each "<key>.US"/"<key>.Vt" pair, W0 = W0s[key]."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".US", ".Vt"))}
    for key in (k.removesuffix(".US") for k in tensors if k.endswith(".US")):
        if f"{key}.Vt" not in tensors or key not in W0s:
            raise NanocustomError(f"{key}: a low-rank factor without its pair or its base weight; the file is not a "
                                  "compressed Custom Diffusion delta of this model")
        out[key] = decompress_delta(tensors[f"{key}.US"], tensors[f"{key}.Vt"], W0s[key].to(tensors[f"{key}.US"]))
    if any(k.endswith(".Vt") and k.removesuffix(".Vt") not in out for k in tensors):
        raise NanocustomError("a .Vt factor without its .US; the file is not a compressed Custom Diffusion delta")
    return out


# ----------------------------------------------------------------------------- merging Custom Diffusion deltas

REG_CAPTIONS = Path(__file__).parent / "assets" / "reg_captions.txt"  # our stand-in for the paper's LAION captions


def target_prompts(token, class_word):
    """The captions whose features a concept's merged K/V must map as its own fine-tuned K/V did (the authors'
    composenW.py: the bare "<new1> dog" and the training template "photo of a <new1> dog")."""
    return [f"{token} {class_word}", f"photo of a {token} {class_word}"]


@torch.no_grad()
def token_features(sd, prompts, chunk=256):
    """The text features c the K/V projections read: for each prompt, its tokens after the start token up to and
    including the first EOS (no padding), as in composenW.py -> [tokens, dim] in float64. Encoded `chunk`
    prompts at a time, so a thousand regularization captions stay within an SD-size encoder's memory."""
    rows = []
    for start in range(0, len(prompts), chunk):
        ids = sd.tokenizer.encode(prompts[start:start + chunk]).to(sd.device)
        features = sd.text_encoder(ids).double().cpu()
        rows += [features[i, 1:ids[i].tolist().index(sd.tokenizer.eos_id) + 1] for i in range(len(ids))]
    return torch.cat(rows)


def _attach_for(sd, infos, train="kv"):
    """A new Custom Diffusion delta on sd holding every token of the deltas `infos` describe (their rows are set
    by the caller, so the rare tokens they start from do not matter), after checking the deltas can share one."""
    from nanocustom.personalize import attach
    tokens = [t for info in infos for t in info["tokens"]]
    if len(set(tokens)) != len(tokens):
        raise NanocustomError(f"the deltas claim the same modifier token twice ({tokens}); train each concept "
                              "with its own token, e.g. <new1> and <new2>")
    trained = sorted({info.get("options", {}).get("train", "kv") for info in infos})
    if trained != [train] and train == "kv":
        raise NanocustomError("the Lagrangian merge needs deltas trained on K/V alone (Eq. 4 constrains the "
                              "projections that read the text), and some trained all of attn2 (--train-attn2); "
                              "merge them with --merge add, or retrain without --train-attn2")
    if trained != [train]:
        raise NanocustomError("the deltas trained different parts of attn2 (some with --train-attn2, some "
                              "without); add deltas trained alike")
    return attach(sd, "custom", tokens=tokens, init_from=list(range(len(tokens))), train=train)


def merge_custom_deltas(sd, deltas, class_words, reg_captions=None, log=print):
    """N Custom Diffusion deltas (state dicts + metadata, as load_file / read_delta_metadata give them) -> one
    delta's tensors and tokens: every K/V matrix solved by Eq. 5, all modifier tokens kept. class_words: per
    delta, its concept's class ("dog"), or for a delta trained jointly on several tokens, one class per token.
    sd is the base model, without any delta attached. Prints the mean relative residual on the targets and on
    the regularization captions."""
    tensors, infos = zip(*deltas)
    delta = _attach_for(sd, infos)  # the base K/V plus every concept's token rows
    with torch.no_grad():
        delta.embedding.rows.copy_(torch.cat([t["modifier_tokens"] for t in tensors]))
    concepts = []  # (the fine-tuned tensors, the features of this token's target captions), token by token
    for t, info, words in zip(tensors, infos, class_words):
        words = [words] if isinstance(words, str) else list(words)
        if len(words) != len(info["tokens"]):
            raise NanocustomError(f"the delta for {info['tokens']} needs one class word per token, got {words}")
        concepts += [(t, token_features(sd, target_prompts(tok, w))) for tok, w in zip(info["tokens"], words)]
    C = torch.cat([Ci for _, Ci in concepts])
    reg_captions = reg_captions or REG_CAPTIONS.read_text().splitlines()
    C_reg = token_features(sd, reg_captions)
    with warnings.catch_warnings():  # "photo of a" opens every concept's prompt: the same rows (causal attention)
        warnings.filterwarnings("ignore", message="inconsistent constraints: repeated rows")  # with each concept's
        solver = MergeSolver(C, gram=RegularizerGram(C_reg))  # targets; they fit the mean, as expected here
    merged, target_res, reg_res = {}, [], []
    for key, W0 in delta.originals_by_key().items():
        W0 = W0.double().cpu()
        V = torch.cat([t[key].double().cpu() @ Ci.T for t, Ci in concepts], dim=1)  # V = [W_n c^T]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="inconsistent constraints: repeated rows")
            W = solver.solve(W0, V)
        merged[key] = W.float()
        target_res.append(solver.constraint_residual(W, V))
        reg_res.append(((W - W0) @ C_reg.T).norm().item() / (W0 @ C_reg.T).norm().item())
    log(f"merged {len(concepts)} concepts into {len(merged)} K/V matrices: mean relative residual "
        f"{sum(target_res) / len(target_res):.2e} on the targets (repeated rows: their mean), "
        f"{sum(reg_res) / len(reg_res):.2e} on {len(reg_captions)} regularization captions")
    delta.load_state_dict({**merged, "modifier_tokens": delta.embedding.rows.detach()})
    return delta


def add_custom_deltas(sd, deltas):
    """The baseline Kumari et al. compare against: W = W0 + sum_n (W_n - W0), every token kept. Deltas trained on
    all of attn2 add as they are (all of them must have trained the same projections)."""
    tensors, infos = zip(*deltas)
    delta = _attach_for(sd, infos, train=infos[0].get("options", {}).get("train", "kv"))
    added = {key: W0 + sum(t[key].to(W0) - W0 for t in tensors) for key, W0 in delta.originals_by_key().items()}
    delta.load_state_dict({**added, "modifier_tokens": torch.cat([t["modifier_tokens"] for t in tensors])})
    return delta


# ----------------------------------------------------------------------------- combining saved deltas

def class_words(info):
    """The class of each of a delta's modifier tokens, read off its training prompts: what follows the token,
    "photo of a <new1> tortoise plushy" -> "tortoise plushy" (composenW.py's --categories, which users give)."""
    import re
    prompts = info.get("training", {}).get("prompt") or []
    found = {m.group(1): m.group(2).strip(" .,") for p in prompts for m in re.finditer(r"(<[^<>\s]+>)\s+([^<>]+)", p)}
    missing = [t for t in info["tokens"] if not found.get(t)]
    if missing:
        raise NanocustomError(f"the delta for {info.get('tokens')} records no training prompt naming {missing} before "
                              "a class word; retrain it with train.py, or merge with how='add'")
    return [found[t] for t in info["tokens"]]


def combine(sd, paths, how="lagrangian", scales=None, force=False, reg_captions=None, log=print):
    """Several saved deltas of one method -> one delta attached to sd, unfolded (fold() it to sample fast).

    custom:   how="lagrangian" (Kumari et al. Eq. 5) or "add" (W0 + sum of the changes, the paper's baseline);
    svdiff:   the spectral shifts add (Han et al. Eq. 4), times `scales` if given (Eq. 5, App. E.3);
    residual: sum_k s_k A_k B_k, the residuals of the concepts together (Ham et al. §3.2).
    The modifier tokens of every delta are kept, with their rows."""
    from nanocustom.personalize import attach, check_made_for, read_delta_metadata, read_delta_tensors, residual_sum
    infos = [read_delta_metadata(p) for p in paths]
    methods = sorted({info["method"] for info in infos})
    if len(methods) != 1:
        raise NanocustomError(f"cannot combine deltas of different methods ({', '.join(methods)}); "
                              "combine one method at a time")
    for path, info in zip(paths, infos):
        check_made_for(sd, path, info, force, "load the base it was trained on, or pass force=True")
    tensors = [read_delta_tensors(sd, p, info, device="cpu") for p, info in zip(paths, infos)]  # low rank: W0 + U S V^T
    method = methods[0]
    if method == "custom":
        if how not in ("lagrangian", "add"):
            raise NanocustomError(f"how={how!r}: Custom Diffusion deltas merge by 'lagrangian' or 'add'")
        deltas = list(zip(tensors, infos))
        if how == "add":
            return add_custom_deltas(sd, deltas)
        return merge_custom_deltas(sd, deltas, [class_words(i) for i in infos], reg_captions, log)
    tokens = [t for info in infos for t in info["tokens"]]
    if len(set(tokens)) != len(tokens):
        raise NanocustomError(f"the deltas claim the same modifier token twice ({tokens}); train each concept "
                              "with its own token, e.g. <new1> and <new2>")
    rows = [t.pop("modifier_tokens") for t in tensors if "modifier_tokens" in t]
    if any(set(t) != set(tensors[0]) for t in tensors):
        raise NanocustomError(f"the {method} deltas hold different tensors (another subset or options); combine "
                              "deltas trained with the same settings")
    scales = [1.0] * len(paths) if scales is None else list(scales)
    if method == "svdiff":
        combined = {k: sum(s * t[k] for s, t in zip(scales, tensors)) for k in tensors[0]}
    else:
        combined = residual_sum(tensors, scales)
    options = {**infos[0].get("options", {}), "init_from": list(range(len(tokens)))}  # rows set below
    delta = attach(sd, method, tokens=tokens, **{k: v for k, v in options.items() if k not in ("train_tokens",)})
    if rows:
        combined["modifier_tokens"] = torch.cat(rows)
    delta.load_state_dict(combined)
    return delta
