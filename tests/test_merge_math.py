"""The closed-form merge of Custom Diffusion (Eq. 4-5, App. A) and the low-rank compression (App. B).

The merge is checked against its definition, not against itself: the constraints hold, no feasible
perturbation lowers the objective, and a generic KKT solve of Eq. 4 gives the same W.
"""
import math
import warnings

import pytest
import torch

from nanocustom.merge import (MergeSolver, RegularizerGram, compress_delta, decompress_delta, delta_storage,
                              lagrangian_merge)

f64 = torch.float64


def two_concepts(o=16, dim=32, tokens=3, s_reg=200, seed=0):
    """A small Eq. 4 problem: two fine-tuned matrices W1, W2, each with its own target tokens."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=f64)  # noqa: E731
    C_reg = randn(s_reg, dim) * torch.logspace(0, 1, dim, dtype=f64)  # features with uneven scales
    W0 = randn(o, dim)
    W1, W2 = W0 + 0.1 * randn(o, dim), W0 + 0.1 * randn(o, dim)
    C1, C2 = randn(tokens, dim), randn(tokens, dim)
    C = torch.cat([C1, C2])  # Eq. 4: C = [c_1 ... c_N]^T
    V = torch.cat([W1 @ C1.T, W2 @ C2.T], dim=1)  # Eq. 4: V = [W_1 c_1^T ... W_N c_N^T]^T, as [o, s]
    return W0, C, V, C_reg


def objective(W, W0, C_reg):
    return float(torch.linalg.norm(W @ C_reg.T - W0 @ C_reg.T) ** 2)  # Eq. 4, squared


def relative_residual(W, C, V):
    return float(torch.linalg.norm(W @ C.T - V) / torch.linalg.norm(V))


def kkt_solve(W0, C, V, G):
    """Eq. 4 row by row: min (w - w0)^T G (w - w0) s.t. C w = v, i.e. [[G, C^T], [C, 0]] [w; mu] = [G w0; v]."""
    dim, s = G.shape[0], C.shape[0]
    K = torch.cat([torch.cat([G, C.T], dim=1), torch.cat([C, torch.zeros(s, s, dtype=f64)], dim=1)])
    rhs = torch.cat([G @ W0.T, V.T])  # one column per row of W
    return torch.linalg.solve(K, rhs)[:dim].T


def test_constraints_hold_to_1e_8_relative_without_warnings():
    W0, C, V, C_reg = two_concepts()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the well-posed problem takes no fallback
        W = lagrangian_merge(W0, C, V, C_reg)
    assert W.dtype == f64 and W.shape == W0.shape
    assert relative_residual(W, C, V) < 1e-8


def test_no_feasible_perturbation_lowers_the_objective():
    W0, C, V, C_reg = two_concepts()
    W = lagrangian_merge(W0, C, V, C_reg)
    f = objective(W, W0, C_reg)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        Z = torch.randn(W.shape, generator=g, dtype=f64)
        P = Z - torch.linalg.solve(C @ C.T, C @ Z.T).T @ C  # rows of Z projected onto the null space of C^T
        assert torch.linalg.norm(P @ C.T) < 1e-10 * torch.linalg.norm(P)  # W + P is feasible
        for t in (1e-3, 1e-1, 1.0):
            assert objective(W + t * P, W0, C_reg) > f
        # first-order optimality: the cross term vanishes, f(W + P) = f(W) + ||P C_reg^T||^2
        assert math.isclose(objective(W + P, W0, C_reg), f + float(torch.linalg.norm(P @ C_reg.T) ** 2), rel_tol=1e-9)


def test_matches_a_generic_kkt_solve():
    W0, C, V, C_reg = two_concepts()
    W = lagrangian_merge(W0, C, V, C_reg)
    torch.testing.assert_close(W, kkt_solve(W0, C, V, C_reg.T @ C_reg), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs_are_solved_in_float64_and_returned_in_their_dtype(dtype):
    W0, C, V, C_reg = (x.to(dtype) for x in two_concepts())
    W = lagrangian_merge(W0, C, V, C_reg)
    assert W.dtype == dtype
    # bit for bit the float64 solve of the same (rounded) inputs, rounded once at the end
    W_64 = lagrangian_merge(*(x.to(f64) for x in (W0, C, V, C_reg)))
    assert torch.equal(W, W_64.to(dtype))


def test_duplicate_constraint_rows_give_the_same_answer_as_without_them():
    W0, C, V, C_reg = two_concepts()
    C_dup, V_dup = torch.cat([C, C[[0, 4, 0]]]), torch.cat([V, V[:, [0, 4, 0]]], dim=1)  # as repeated tokens would
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact duplicates with equal targets are dropped, no fallback
        solver = MergeSolver(C_dup, C_reg)
        W = solver.solve(W0, V_dup)
    assert solver.C.shape[0] == C.shape[0]
    torch.testing.assert_close(W, lagrangian_merge(W0, C, V, C_reg), rtol=1e-12, atol=1e-12)


def test_repeated_rows_with_different_targets_fit_their_mean():
    W0, C, V, C_reg = two_concepts()
    V_other = V[:, :1] + 1.0  # the same token, but a different target (as two concepts' models would give)
    with pytest.warns(UserWarning, match="inconsistent constraints: repeated rows"):
        W = lagrangian_merge(W0, torch.cat([C, C[:1]]), torch.cat([V, V_other], dim=1), C_reg)
    assert torch.isfinite(W).all()
    torch.testing.assert_close(W @ C[0], (V[:, 0] + V_other[:, 0]) / 2)  # least squares over the two copies


def test_solver_reused_across_matrices_equals_one_shot_calls():
    _, C, _, C_reg = two_concepts()
    gram = RegularizerGram(C_reg)  # shared by every matrix and every constraint set
    solver = MergeSolver(C, gram=gram)
    g = torch.Generator().manual_seed(2)
    for o in (8, 16, 40):  # like SD's 320/640/1280-wide K and V matrices
        W0 = torch.randn(o, C.shape[1], generator=g, dtype=f64)
        V = torch.randn(o, C.shape[0], generator=g, dtype=f64)
        W = solver.solve(W0, V)
        assert torch.equal(W, lagrangian_merge(W0, C, V, C_reg))
        assert torch.equal(W, lagrangian_merge(W0, C, V, gram=gram))


def test_rank_deficient_C_reg_falls_back_to_a_ridge():
    W0, C, V, C_reg = two_concepts(s_reg=20)  # 20 regularization rows < dim 32: C_reg^T C_reg is singular
    with pytest.warns(UserWarning, match="C_reg has rank 20 of dim 32"):
        gram = RegularizerGram(C_reg)
    W = lagrangian_merge(W0, C, V, gram=gram)
    assert torch.isfinite(W).all()
    assert relative_residual(W, C, V) < 1e-8
    # it is exactly Eq. 4 with ridge * ||W - W0||^2 added to the objective
    G_ridge = C_reg.T @ C_reg + gram.ridge * torch.eye(C.shape[1], dtype=f64)
    torch.testing.assert_close(W, kkt_solve(W0, C, V, G_ridge), rtol=1e-7, atol=1e-7)


def test_dependent_constraints_fall_back_to_the_pseudo_inverse_and_still_hold():
    W0, C, V, C_reg = two_concepts()
    W_target = torch.linalg.lstsq(C, V.T).solution.T  # some W satisfying W C^T = V
    C_dep = torch.cat([C, C[:1] + 2 * C[3:4]])  # a 7th row dependent on two others: d C^T is singular
    V_dep = W_target @ C_dep.T  # consistent targets
    with pytest.warns(UserWarning, match="d C\\^T is singular"):
        W = lagrangian_merge(W0, C_dep, V_dep, C_reg)
    assert torch.isfinite(W).all()
    assert relative_residual(W, C_dep, V_dep) < 1e-8
    # the dependent row adds no constraint: same answer as without it
    torch.testing.assert_close(W, lagrangian_merge(W0, C, V, C_reg), rtol=1e-8, atol=1e-8)


def test_inconsistent_constraints_return_the_least_squares_fit_with_a_warning():
    W0, C, V, C_reg = two_concepts()
    C_dep = torch.cat([C, C[:1] + 2 * C[3:4]])
    V_bad = torch.cat([V, V[:, :1] + 2 * V[:, 3:4] + 1.0], dim=1)  # the 7th target breaks the dependency
    with pytest.warns(UserWarning) as record:
        W = lagrangian_merge(W0, C_dep, V_bad, C_reg)
    messages = [str(w.message) for w in record]
    assert any("d C^T is singular" in m for m in messages)
    assert any("inconsistent constraints" in m and "residual" in m for m in messages)
    assert torch.isfinite(W).all()
    # the residual is the smallest any W can reach
    best = torch.linalg.norm(C_dep @ torch.linalg.lstsq(C_dep, V_bad.T).solution - V_bad.T)
    assert math.isclose(float(torch.linalg.norm(W @ C_dep.T - V_bad)), float(best), rel_tol=1e-8)


# -----------------------------------------------------------------------------
# Appendix B: low-rank deltas

def delta_with_spectrum(S, o=12, dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(o, len(S), generator=g, dtype=f64))
    Vt = torch.linalg.qr(torch.randn(dim, len(S), generator=g, dtype=f64))[0].T
    W0 = torch.randn(o, dim, generator=g, dtype=f64)
    return W0 + U @ torch.diag(torch.tensor(S, dtype=f64)) @ Vt, W0


def test_compression_error_falls_as_keep_grows_and_vanishes_at_keep_1():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(40, 32, generator=g, dtype=f64)
    W = W0 + torch.randn(40, 32, generator=g, dtype=f64)
    errors = []
    for keep in (0.01, 0.1, 0.3, 0.6, 0.9, 0.99, 1.0):
        US, Vt = compress_delta(W, W0, keep)
        errors.append(float(torch.linalg.norm(decompress_delta(US, Vt, W0) - W)))
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12 * float(torch.linalg.norm(W - W0))
    assert errors[0] > 0


def test_keep_counts_the_sum_of_singular_values_not_of_their_squares():
    W, W0 = delta_with_spectrum([4.0, 3.0, 2.0, 1.0])  # cumulative sums: 0.4, 0.7, 0.9, 1.0 of the total
    assert compress_delta(W, W0, 0.35)[1].shape[0] == 1
    assert compress_delta(W, W0, 0.75)[1].shape[0] == 3  # by s^2 (0.53, 0.83, ...) it would be 2
    assert compress_delta(W, W0, 0.95)[1].shape[0] == 4


def test_storage_is_rank_times_both_sides():
    W, W0 = delta_with_spectrum([4.0, 3.0, 2.0, 1.0])
    US, Vt = compress_delta(W.float(), W0.float(), 0.75)  # rank 3, float32
    assert US.dtype == Vt.dtype == torch.float32
    storage = delta_storage(W0.float(), US, Vt)
    assert storage["full_params"] == 12 * 10 and storage["low_rank_params"] == 3 * (12 + 10)
    assert storage["full_bytes"] == 4 * 12 * 10 and storage["low_rank_bytes"] == 4 * 3 * (12 + 10)


def test_zero_delta_compresses_to_rank_0():
    W0 = torch.randn(6, 5, dtype=f64)
    US, Vt = compress_delta(W0.clone(), W0, 0.6)
    assert US.shape == (6, 0) and Vt.shape == (0, 5)
    assert torch.equal(decompress_delta(US, Vt, W0), W0)


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, float("nan")])
def test_keep_outside_0_1_raises(keep):
    W0 = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        compress_delta(W0 + 1, W0, keep)
