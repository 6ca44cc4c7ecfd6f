"""Penalised linear nuisance models for wide features (image embeddings), fitted fast.

The statistics are exactly those of the scikit-learn pipelines they stand in for (which stay in
:mod:`eocausal.estimate.nuisance` as the reference, ``solver="sklearn"``):

- :class:`PenalisedLogisticCV`: StandardScaler, then l2-penalised logistic regression whose C is
  chosen from ``Cs`` by stratified K-fold inner cross-validation on the mean Bernoulli
  log-likelihood, then refitted on all rows at that C — scikit-learn's
  ``LogisticRegressionCV(Cs, cv=StratifiedKFold(K, shuffle=True, random_state=seed))`` with the
  same splits, the same grid and the same selection rule (first best mean score);
- :class:`PenalisedRidgeCV`: StandardScaler, then ridge regression (unpenalised intercept) whose
  alpha is chosen by exact leave-one-out squared error — scikit-learn's ``RidgeCV(alphas)``.

Why they are fast (what dominates at n = 100,000 x p = 1,024 is the logistic penalty tuning:
10 penalties x 3 inner folds + 1 refit per cross-fitting fold, each an lbfgs run of hundreds of
matrix-vector passes over an ill-conditioned embedding matrix):

1. One thin SVD of the standardised training matrix, X_s = Q S V' (from the p x p Gram matrix
   when p <= n, from the n x n one when p > n), serves every fit on those rows. In the
   coordinates u = S V' w the l2 penalty is diagonal (u_j^2 / s_j^2) and the columns of Q are
   orthonormal, so the logistic Hessian Q'WQ + diag(1 / (C s^2)) is close to diagonal: a
   diagonally preconditioned Newton-CG converges in a handful of steps, where lbfgs on the raw
   columns crawls. The rotation changes the parametrisation, not the optimum.
2. The 30 inner-CV problems are solved together. Inner folds are row masks on the same matrix,
   so each Newton-CG step multiplies Q by an r x 30 block: one matrix-matrix product running
   near the CPU's peak instead of 30 matrix-vector products waiting on memory.
3. Ridge leave-one-out errors for every alpha come from the same SVD: with shrinkage
   f_j = s_j^2 / (s_j^2 + alpha), fitted values are ybar + Q (f * Q'y) and leverages
   h_i = 1/n + sum_j Q_ij^2 f_j, so the LOO residual is (y_i - yhat_i) / (1 - h_i).
4. Weakly penalised fits on few rows per feature are ill-conditioned even so: their Newton steps
   ran CG to its 60-pass cap, ~50 times per fit, and the passes' small products cost mostly
   interpreter time. Once a step has taken ``DIRECT_AFTER_CG_PASSES`` passes, the later steps
   form each problem's (r+1) x (r+1) Hessian and solve it by Cholesky, where that is cheap
   (``DIRECT_SOLVE_FLOPS``): Newton then converges in a few steps to the same optimum.

Every logistic fit runs until its Newton decrement is below ``tol`` per observation (1e-12 by
default), far tighter than scikit-learn's lbfgs stopping rule, so the two agree to the
reference's own tolerance. Eigen-directions below 1e-12 of the largest eigenvalue (numerically
zero) are dropped, as in the row-space projection of the reference.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold

# Relative eigenvalue below which a direction of the standardised data counts as numerically 0.
RANK_RTOL = 1e-12
# Conjugate gradients stop at this relative residual or earlier. Solving each Newton system only
# this well makes Newton converge linearly (rate ~ this) instead of superlinearly, which costs a
# step or two but saves the long CG runs that ill-conditioned, weakly penalised fits need at tight
# residuals; the stopping rule (Newton decrement) is unchanged.
MIN_FORCING = 0.1
# Rows per block when forming row-wise quantities, to bound temporary memory.
_ROW_BLOCK = 16_384
# Once a Newton step's CG took this many passes, the later steps solve their systems exactly
# (each problem's (r+1) x (r+1) Hessian formed and factored), where forming them costs at most
# DIRECT_SOLVE_FLOPS multiply-adds (n r^2 per problem). Weakly penalised fits on few rows (a
# 487-unit study: ~50 Newton steps, most at the 60-pass cap) otherwise spend their time in CG;
# well-conditioned ones converge in a few passes, which cost less than forming the Hessians.
DIRECT_AFTER_CG_PASSES = 20
DIRECT_SOLVE_FLOPS = 2e9


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales exactly as scikit-learn's StandardScaler computes them
    (population sd; near-constant columns get scale 1)."""
    n = X.shape[0]
    mean = X.mean(axis=0)
    var = X.var(axis=0)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant | (scale < 10 * eps)] = 1.0
    return mean, scale


class GramBlocks:
    """Centred cross-products of X per (cross-fitting fold, treatment arm), computed once.

    Every nuisance fit's training set is a union of such blocks (the other folds, one arm or
    both), so its Gram matrix is a sum of blocks, corrected for its own mean, instead of a fresh
    n x p x p product per fit: 1 product over X in place of ~8 (5 propensity fits on 4/5 of the
    rows, 10 arm outcome fits on 2/5). Blocks are formed on X minus its column means to keep the
    mean correction free of cancellation.
    """

    def __init__(self, X: np.ndarray, fold_ids: np.ndarray, d: np.ndarray):
        X = np.asarray(X, dtype=np.float64)
        self.shift = X.mean(axis=0)
        self.blocks = {}
        for k in np.unique(fold_ids):
            for arm in (0, 1):
                rows = np.flatnonzero((fold_ids == k) & (d == arm))
                block = X[rows] - self.shift
                self.blocks[int(k), arm] = (block.T @ block, block.sum(axis=0), rows.size)

    def centred(self, fold: int, arms=(0, 1)) -> np.ndarray:
        """sum_i (x_i - m)(x_i - m)' over the training rows of ``fold`` (all other folds) in
        ``arms``, m their mean."""
        parts = [v for (k, arm), v in self.blocks.items() if k != fold and arm in arms]
        cross = sum(g for g, _, _ in parts)
        total = sum(t for _, t, _ in parts)
        count = sum(c for _, _, c in parts)
        return cross - np.outer(total, total) / count

    @staticmethod
    def standardised(centred: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """X_s'X_s for X_s = (X - mean) / scale, from the centred cross-product."""
        return centred / np.outer(scale, scale)


class WhitenedDesign:
    """A standardised matrix X_s in the coordinates of its thin SVD, X_s = Q diag(s) V'.

    The solvers need products with Q (n x r, orthonormal columns). When p <= n, Q is never
    formed: with T = V diag(1/s) (p x r), Q U = X_s (T U) and Q'R = T'(X_s' R) cost about what
    products with Q cost, while forming Q would cost as much as a few dozen of them. When p > n,
    Q comes straight from the n x n Gram matrix. ``eigenvalues`` are s^2; directions with
    s^2 <= RANK_RTOL * max s^2 are dropped. Coefficients on X_s are w = T u.

    ``fast=True`` products use a float32 copy: they serve the Hessian products of the
    conjugate-gradient inner loop, whose accuracy only steers the Newton direction. Gradients and
    objectives stay in float64, so the optimum reached is the float64 one.
    """

    def __init__(self, Xs: np.ndarray, low_precision: bool = True, gram: np.ndarray | None = None):
        n, p = Xs.shape
        if p <= n:
            # X_s'X_s: given (from fold blocks, see GramBlocks), or a symmetric rank-k update.
            gram = Xs.T @ Xs if gram is None else gram
            eigenvalues, V = np.linalg.eigh(gram)
            keep = _kept(eigenvalues)
            eigenvalues, V = eigenvalues[keep], V[:, keep]
            self.T = V / np.sqrt(eigenvalues)
            self._Xs, self._Q = Xs, None
            self._low = Xs.astype(np.float32) if low_precision else Xs
        else:
            gram = Xs @ Xs.T
            eigenvalues, E = np.linalg.eigh(gram)
            keep = _kept(eigenvalues)
            eigenvalues, E = eigenvalues[keep], E[:, keep]
            self.T = (Xs.T @ E) / eigenvalues
            self._Xs, self._Q = None, np.ascontiguousarray(E)
            self._low = self._Q.astype(np.float32) if low_precision else self._Q
        self.eigenvalues = eigenvalues
        self.n = n
        self._basis: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.size)

    def dot(self, U: np.ndarray, fast: bool = False, rows=slice(None)) -> np.ndarray:
        """Q[rows] @ U for U (r x K); ``rows`` a slice (a view, no copy)."""
        fast = fast and self._low.dtype == np.float32
        if self._Q is not None:
            if fast:
                return (self._low[rows] @ U.astype(np.float32)).astype(np.float64)
            return self._Q[rows] @ U
        TU = self.T @ U
        if fast:
            return (self._low[rows] @ TU.astype(np.float32)).astype(np.float64)
        return self._Xs[rows] @ TU

    def tdot(self, R: np.ndarray, fast: bool = False, rows=slice(None)) -> np.ndarray:
        """Q[rows]' @ R for R (len(rows) x K)."""
        fast = fast and self._low.dtype == np.float32
        if self._Q is not None:
            if fast:
                return (self._low[rows].T @ R.astype(np.float32)).astype(np.float64)
            return self._Q[rows].T @ R
        if fast:
            return self.T.T @ (self._low[rows].T @ R.astype(np.float32)).astype(np.float64)
        return self.T.T @ (self._Xs[rows].T @ R)

    def rows(self, index) -> np.ndarray:
        """Rows of Q (explicitly), e.g. a block of rows."""
        if self._Q is not None:
            return self._Q[index]
        return self._Xs[index] @ self.T

    def basis(self) -> np.ndarray:
        """Q itself (n x r, float64), formed once: the direct Newton solves' Hessians need it
        (kept apart from ``_Q``, whose presence chooses how the products are formed)."""
        if self._Q is not None:
            return self._Q
        if self._basis is None:
            self._basis = np.ascontiguousarray(self._Xs @ self.T)
        return self._basis


def _kept(eigenvalues: np.ndarray) -> np.ndarray:
    top = eigenvalues[-1] if eigenvalues.size else 0.0
    keep = eigenvalues > max(top, 0.0) * RANK_RTOL
    if not keep.any():
        # An all-constant matrix: keep one (zero-information) direction so shapes stay valid.
        keep[-1] = True
    return keep


class RowBlocks:
    """Which contiguous row blocks each of K problems fits on.

    The inner-CV problems of one fold skip that fold's rows. With the rows ordered by inner fold,
    each block's product only involves the problems that use it, so no multiply is spent on rows
    a problem masks out (a third of them with 3 inner folds).
    """

    def __init__(self, blocks: list[tuple[slice, np.ndarray]]):
        self.blocks = [(rows, np.asarray(member, dtype=bool)) for rows, member in blocks]

    @classmethod
    def single(cls, n: int, K: int) -> "RowBlocks":
        return cls([(slice(0, n), np.ones(K, dtype=bool))])

    def dot(self, design: WhitenedDesign, U: np.ndarray, problems: np.ndarray, fast: bool = False) -> np.ndarray:
        """Q @ U where column c of U belongs to problem problems[c]; rows a problem does not use
        are left at 0 (its mask ignores them)."""
        out = np.zeros((design.n, U.shape[1]))
        for rows, member in self.blocks:
            cols = np.flatnonzero(member[problems])
            if cols.size == U.shape[1]:
                out[rows] = design.dot(U, fast, rows)
            elif cols.size:
                out[rows, cols] = design.dot(U[:, cols], fast, rows)
        return out

    def tdot(self, design: WhitenedDesign, R: np.ndarray, problems: np.ndarray, fast: bool = False) -> np.ndarray:
        """Q' @ R, R zero on the rows each problem does not use."""
        out = np.zeros((design.rank, R.shape[1]))
        for rows, member in self.blocks:
            cols = np.flatnonzero(member[problems])
            if cols.size == R.shape[1]:
                out += design.tdot(R[rows], fast, rows)
            elif cols.size:
                out[:, cols] += design.tdot(R[rows][:, cols], fast, rows)
        return out


# --- logistic regression ------------------------------------------------------------------------


class PenalisedLogisticCV(ClassifierMixin, BaseEstimator):
    """StandardScaler + l2 logistic regression with C tuned by stratified inner CV (log-likelihood).

    Attributes after ``fit``: ``C_``, ``coef_`` (1 x p, on the raw columns), ``intercept_``,
    ``scores_`` (inner folds x Cs mean log-likelihoods), ``n_iter_`` and ``classes_``.
    """

    def __init__(self, Cs=10, inner_folds: int = 3, seed: int = 0, tol: float = 1e-12, max_iter: int = 100,
                 undersmooth: float = 1.0):
        self.Cs = Cs
        self.undersmooth = undersmooth
        self.inner_folds = inner_folds
        self.seed = seed
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, X, y, centred_gram=None):
        """``centred_gram``: sum (x_i - mean)(x_i - mean)' over these rows, if already known
        (:class:`GramBlocks`); it saves the largest product of the fit."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        self.classes_, y01 = np.unique(y, return_inverse=True)
        if self.classes_.size != 2:
            raise ValueError(f"PenalisedLogisticCV needs two classes, got {self.classes_.tolist()}")
        y01 = y01.astype(np.float64)
        Cs = np.logspace(-4, 4, self.Cs) if np.isscalar(self.Cs) else np.asarray(self.Cs, dtype=float)
        self.Cs_ = Cs
        mean, scale = standardise(X)
        n = X.shape[0]
        # The same splits LogisticRegressionCV draws from this splitter (they depend on y only).
        splitter = StratifiedKFold(self.inner_folds, shuffle=True, random_state=self.seed)
        splits = list(splitter.split(np.zeros((n, 1)), y01))
        n_folds, n_cs = len(splits), Cs.size
        # Rows ordered by inner fold (the fit does not depend on row order): fold f's held-out
        # rows are block f, and its problems skip that block.
        order = np.concatenate([test for _, test in splits])
        bounds = np.cumsum([0] + [len(test) for _, test in splits])
        gram = None if centred_gram is None else GramBlocks.standardised(centred_gram, scale)
        design = WhitenedDesign(((X - mean) / scale)[order], gram=gram)
        y_ordered = y01[order]
        problem_fold = np.repeat(np.arange(n_folds), n_cs)
        blocks = RowBlocks([(slice(bounds[f], bounds[f + 1]), problem_fold != f) for f in range(n_folds)])
        masks = np.ones((n, n_folds * n_cs))
        penalties = np.empty((design.rank, n_folds * n_cs))
        for f in range(n_folds):
            masks[bounds[f] : bounds[f + 1], f * n_cs : (f + 1) * n_cs] = 0.0
            for c, C in enumerate(Cs):
                penalties[:, f * n_cs + c] = 1.0 / (C * design.eigenvalues)
        U, b, iters, ok = fit_logistic_batch(
            design, y_ordered, masks, penalties, tol=self.tol, max_iter=self.max_iter, blocks=blocks,
        )

        scores = np.empty((n_folds, n_cs))
        for f in range(n_folds):
            held_out = slice(bounds[f], bounds[f + 1])
            eta = design.dot(U[:, f * n_cs : (f + 1) * n_cs], rows=held_out) + b[f * n_cs : (f + 1) * n_cs]
            scores[f] = _mean_log_likelihood(eta, y_ordered[held_out, None])
        best = int(np.argmax(scores.sum(axis=0)))  # first best, as LogisticRegressionCV
        # undersmooth > 1: the final fit penalises that much less than the CV choice (a nuisance
        # for a doubly robust score wants less shrinkage than the best predictor has).
        self.C_ = float(Cs[best]) * float(self.undersmooth)
        self.scores_ = scores

        # Refit on every row at the chosen C, started from the folds' mean solution.
        chosen = [f * n_cs + best for f in range(n_folds)]
        U_all, b_all, iters_all, ok_all = fit_logistic_batch(
            design, y_ordered, np.ones((n, 1)), (1.0 / (self.C_ * design.eigenvalues))[:, None],
            U0=U[:, chosen].mean(axis=1, keepdims=True), b0=np.array([b[chosen].mean()]),
            tol=self.tol, max_iter=self.max_iter,
        )
        self.n_iter_ = int(iters.max(initial=0) + iters_all[0])
        if not (ok.all() and ok_all.all()):
            warnings.warn(
                f"PenalisedLogisticCV: {int((~ok).sum() + (~ok_all).sum())} of {ok.size + 1} fits "
                f"stopped short of tol={self.tol} (max_iter={self.max_iter} reached, or the line "
                "search stalled)",
                ConvergenceWarning,
                stacklevel=2,
            )
        coef_std = design.T @ U_all[:, 0]
        self.coef_ = (coef_std / scale)[None, :]
        self.intercept_ = np.array([b_all[0] - self.coef_[0] @ mean])
        return self

    def decision_function(self, X):
        return np.asarray(X, dtype=np.float64) @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X):
        p = expit(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X):
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


def _mean_log_likelihood(eta: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The reference scorer clips probabilities to [1e-15, 1 - 1e-15]; do the same.
    p = np.clip(expit(eta), 1e-15, 1.0 - 1e-15)
    return np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p), axis=0)


def _logistic_objective(eta, y, masks, U, penalties) -> np.ndarray:
    loss = masks * (np.logaddexp(0.0, eta) - y * eta)
    return loss.sum(axis=0) + 0.5 * (penalties * U * U).sum(axis=0)


def fit_logistic_batch(
    design: WhitenedDesign,
    y: np.ndarray,
    masks: np.ndarray,
    penalties: np.ndarray,
    U0: np.ndarray | None = None,
    b0: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
    max_cg: int = 60,
    blocks: RowBlocks | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve K l2-logistic problems on one design at once by Newton's method, each step's systems
    solved by preconditioned CG, or exactly once CG has struggled and exact solves are cheap
    (``DIRECT_AFTER_CG_PASSES``, ``DIRECT_SOLVE_FLOPS``).

    Problem k: minimise sum_i masks[i, k] * logloss(y_i, Q_i u + b) + 0.5 sum_j penalties[j, k] u_j^2
    (intercept b unpenalised), Q the design's orthonormal basis, which makes the diagonal
    preconditioner mean(w) + penalties good. Stops problem k when its Newton decrement
    g' H^-1 g / 2 is below ``tol`` times its number of rows.

    ``blocks`` (optional) says which row blocks each problem uses, consistently with ``masks``;
    products then skip the blocks a problem masks out.

    Returns U (r x K), b (K,), Newton iterations (K,) and converged flags (K,): False where
    max_iter ran out, or where the line search stalled before the decrement was small.
    """
    n, r = design.n, design.rank
    K = masks.shape[1]
    blocks = blocks or RowBlocks.single(n, K)
    y = y.reshape(-1, 1)
    n_rows = masks.sum(axis=0)
    if U0 is None:
        U = np.zeros((r, K))
    else:
        U = np.array(U0, dtype=np.float64, copy=True)
    if b0 is None:
        share = np.clip((masks * y).sum(axis=0) / n_rows, 1e-6, 1 - 1e-6)
        b = np.log(share / (1 - share))
    else:
        b = np.array(b0, dtype=np.float64, copy=True)
    eta = blocks.dot(design, U, np.arange(K)) + b
    objective = _logistic_objective(eta, y, masks, U, penalties)
    converged = np.zeros(K, dtype=bool)
    stuck = np.zeros(K, dtype=bool)
    iterations = np.zeros(K, dtype=np.int64)
    direct = False  # until CG struggles (see DIRECT_AFTER_CG_PASSES)
    for _ in range(max_iter):
        active = np.flatnonzero(~converged)
        if active.size == 0:
            break
        M, E, Ua, P = masks[:, active], eta[:, active], U[:, active], penalties[:, active]
        prob = expit(E)
        residual = M * (prob - y)
        grad_u = blocks.tdot(design, residual, active) + P * Ua
        grad_b = residual.sum(axis=0)
        weight = M * prob * (1.0 - prob)
        if direct:
            step_u, step_b = _newton_direct(design, weight, P, grad_u, grad_b)
        else:
            grad_norm = np.sqrt((grad_u * grad_u).sum(axis=0) + grad_b * grad_b)
            forcing = np.clip(np.sqrt(grad_norm / n_rows[active]), MIN_FORCING, 0.5)
            step_u, step_b, passes = _pcg(design, blocks, active, weight, P, grad_u, grad_b, forcing, max_cg)
            direct = passes >= DIRECT_AFTER_CG_PASSES and float(n) * r * r * active.size <= DIRECT_SOLVE_FLOPS
        decrement = -((grad_u * step_u).sum(axis=0) + grad_b * step_b)
        iterations[active] += 1

        # Converged: the remaining step is negligible; take it and stop.
        small = decrement <= 2.0 * tol * n_rows[active]
        # Backtracking (Armijo) line search for the rest, all problems at once.
        t = np.ones(active.size)
        accepted = small.copy()
        trial_U = Ua + step_u
        trial_b = b[active] + step_b
        trial_eta = blocks.dot(design, trial_U, active) + trial_b
        trial_obj = _logistic_objective(trial_eta, y, M, trial_U, P)
        for _ls in range(40):
            ok = ~accepted & (trial_obj <= objective[active] - 1e-4 * t * decrement)
            accepted |= ok
            pending = np.flatnonzero(~accepted)
            if pending.size == 0:
                break
            t[pending] *= 0.5
            trial_U[:, pending] = Ua[:, pending] + t[pending] * step_u[:, pending]
            trial_b[pending] = b[active[pending]] + t[pending] * step_b[pending]
            trial_eta[:, pending] = blocks.dot(design, trial_U[:, pending], active[pending]) + trial_b[pending]
            trial_obj[pending] = _logistic_objective(
                trial_eta[:, pending], y, M[:, pending], trial_U[:, pending], P[:, pending]
            )
        # A line search that cannot improve means rounding has taken over: stop there (and say
        # so unless the decrement was already small).
        stalled = ~accepted
        stuck[active[stalled & ~small]] = True
        move = accepted
        idx = active[move]
        U[:, idx] = trial_U[:, move]
        b[idx] = trial_b[move]
        eta[:, idx] = trial_eta[:, move]
        objective[idx] = trial_obj[move]
        converged[active[small]] = True
        converged[active[stalled]] = True
    return U, b, iterations, converged & ~stuck


def _newton_direct(design, weight, penalties, grad_u, grad_b):
    """Solve H s = -g for each column exactly: H = [Q'WQ + diag(penalty), Q'w; w'Q, sum w] formed
    and solved by Cholesky (positive definite: the penalty is positive on every kept direction)."""
    from scipy.linalg import cho_factor, cho_solve

    Q = design.basis()
    r, K = grad_u.shape
    step_u, step_b = np.empty((r, K)), np.empty(K)
    H = np.empty((r + 1, r + 1))
    for k in range(K):
        Qw = Q * weight[:, k, None]
        H[:r, :r] = Qw.T @ Q
        H[np.arange(r), np.arange(r)] += penalties[:, k]
        H[:r, r] = H[r, :r] = Qw.sum(axis=0)
        H[r, r] = max(weight[:, k].sum(), 1e-12)
        # Scaled by its diagonal first (the penalties span many orders of magnitude), as the CG's
        # preconditioner does, so the factorisation keeps its accuracy.
        scale = 1.0 / np.sqrt(np.diag(H))
        step = scale * cho_solve(cho_factor(H * np.outer(scale, scale)), -scale * np.append(grad_u[:, k], grad_b[k]))
        step_u[:, k], step_b[k] = step[:r], step[r]
    return step_u, step_b


def _pcg(design, blocks, problems, weight, penalties, grad_u, grad_b, forcing, max_cg):
    """Solve H s = -g for each column by preconditioned conjugate gradients (batched)."""
    n_rows_w = weight.sum(axis=0)
    # Q has orthonormal columns, so diag(Q'WQ) ~ sum(w)/n: the penalty is the varying part.
    diag_u = n_rows_w / design.n + penalties
    diag_b = np.maximum(n_rows_w, 1e-12)

    def hessian_times(v_u, v_b, cols):
        z = blocks.dot(design, v_u, problems[cols], fast=True) + v_b
        wz = weight[:, cols] * z  # the weights are 0 on the rows a problem does not use
        return blocks.tdot(design, wz, problems[cols], fast=True) + penalties[:, cols] * v_u, wz.sum(axis=0)

    K = grad_u.shape[1]
    x_u = np.zeros_like(grad_u)
    x_b = np.zeros(K)
    r_u, r_b = -grad_u, -grad_b.copy()
    z_u, z_b = r_u / diag_u, r_b / diag_b
    d_u, d_b = z_u.copy(), z_b.copy()
    rz = (r_u * z_u).sum(axis=0) + r_b * z_b
    target = forcing * np.sqrt((grad_u * grad_u).sum(axis=0) + grad_b * grad_b)
    running = np.ones(K, dtype=bool)
    passes = 0
    for _ in range(max_cg):
        cols = np.flatnonzero(running)
        if cols.size == 0:
            break
        passes += 1
        h_u, h_b = hessian_times(d_u[:, cols], d_b[cols], cols)
        curvature = (d_u[:, cols] * h_u).sum(axis=0) + d_b[cols] * h_b
        alpha = rz[cols] / np.maximum(curvature, 1e-300)
        x_u[:, cols] += alpha * d_u[:, cols]
        x_b[cols] += alpha * d_b[cols]
        r_u[:, cols] -= alpha * h_u
        r_b[cols] -= alpha * h_b
        residual_norm = np.sqrt((r_u[:, cols] ** 2).sum(axis=0) + r_b[cols] ** 2)
        stop = residual_norm <= target[cols]
        z_u[:, cols] = r_u[:, cols] / diag_u[:, cols]
        z_b[cols] = r_b[cols] / diag_b[cols]
        rz_new = (r_u[:, cols] * z_u[:, cols]).sum(axis=0) + r_b[cols] * z_b[cols]
        beta = rz_new / np.maximum(rz[cols], 1e-300)
        d_u[:, cols] = z_u[:, cols] + beta * d_u[:, cols]
        d_b[cols] = z_b[cols] + beta * d_b[cols]
        rz[cols] = rz_new
        running[cols[stop]] = False
    return x_u, x_b, passes


# --- ridge regression ---------------------------------------------------------------------------


class PenalisedRidgeCV(RegressorMixin, BaseEstimator):
    """StandardScaler + ridge regression with alpha chosen by exact leave-one-out squared error.

    Attributes after ``fit``: ``alpha_``, ``coef_`` (on the raw columns), ``intercept_`` and
    ``loo_mse_`` (one value per alpha).
    """

    def __init__(self, alphas=(0.1, 1.0, 10.0), undersmooth: float = 1.0):
        self.alphas = alphas
        self.undersmooth = undersmooth

    def fit(self, X, y, centred_gram=None):
        """``centred_gram``: as for :meth:`PenalisedLogisticCV.fit`."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).ravel()
        alphas = np.asarray(self.alphas, dtype=np.float64)
        n = X.shape[0]
        mean, scale = standardise(X)
        Xs = (X - mean) / scale
        # RidgeCV centres X and y itself; the scaler has centred X already (up to rounding).
        Xs -= Xs.mean(axis=0)
        gram = None if centred_gram is None else GramBlocks.standardised(centred_gram, scale)
        design = WhitenedDesign(Xs, low_precision=False, gram=gram)
        y_mean = y.mean()
        yc = y - y_mean
        a = design.tdot(yc[:, None])[:, 0]
        shrink = design.eigenvalues[:, None] / (design.eigenvalues[:, None] + alphas[None, :])  # r x A
        mse = np.zeros(alphas.size)
        explicit = Xs.shape[1] > n  # the kernel path holds Q itself
        directions = design.T @ (shrink * a[:, None])  # p x A: fitted values are X_s @ directions
        T_low = design.T.astype(np.float32)
        for start in range(0, n, _ROW_BLOCK):
            rows = slice(start, min(start + _ROW_BLOCK, n))
            if explicit:
                Qb = design.rows(rows)
                fitted = Qb @ (shrink * a[:, None])
                leverage = 1.0 / n + (Qb * Qb) @ shrink
            else:
                # Leverages need the rows of Q, the one n x p x p product of the fit: in float32
                # (leverages to ~1e-7, far inside any difference between alphas that matters);
                # fitted values, coefficients and everything else in float64.
                fitted = Xs[rows] @ directions
                Qb = Xs[rows].astype(np.float32) @ T_low
                leverage = 1.0 / n + ((Qb * Qb) @ shrink.astype(np.float32)).astype(np.float64)
            loo = (yc[rows, None] - fitted) / (1.0 - leverage)
            mse += (loo * loo).sum(axis=0)
        mse /= n
        best = int(np.argmin(mse))  # first best, as RidgeCV
        self.alpha_ = float(alphas[best]) / float(self.undersmooth)
        self.loo_mse_ = mse
        chosen = shrink[:, best] if self.undersmooth == 1.0 else design.eigenvalues / (design.eigenvalues + self.alpha_)
        coef_std = design.T @ (chosen * a)
        self.coef_ = coef_std / scale
        self.intercept_ = float(y_mean - self.coef_ @ mean)
        return self

    def predict(self, X):
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_
