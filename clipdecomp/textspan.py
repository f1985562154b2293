"""TextSpan (Gandelsman et al., ICLR 2024, Algorithm 1) as pure tensor functions.

Given one attention head's direct contributions ``C: [N, D]`` over N images and
T candidate text embeddings ``X: [T, D]``, TextSpan greedily picks k texts whose
directions explain the most variance of the head's outputs:

(a) centre the outputs: ``C0 = C - mean(C)``;
(b) optional rank reduction: keep the top-``rank`` right-singular vectors
    ``V_r: [D, r]`` of ``C0`` and project the texts onto their span,
    ``X <- X V_r V_r^T`` (no renormalisation).  Directions whose variance is
    below ``rank_rtol`` times the largest are dropped: a head's outputs have
    rank <= head_dim + 1 (65 for ViT-L-14), so with rank 80 the trailing
    singular vectors would be an arbitrary, solver-dependent basis of the
    null space and the chosen texts would depend on it;
(c) k times: score every remaining text x by ``var_i(<C0_i, x>)``, pick
    the best, record its explained variance, and project its (residual) unit
    direction u out of ``C0`` and out of every remaining text.

Conventions (and where they differ from the paper's public code):

* Variances are population variances (divide by N); the head's total variance
  is ``trace(C0^T C0 / N)`` and ``cumulative_fraction`` is relative to it.
* By default a text is scored, as in the paper's public code, by the variance
  of ``<C0_i, x>`` with x its unnormalised residual: a text that lies mostly
  outside the head's span (after rank reduction and earlier picks) scores low.
  ``normalize=True`` scores along the unit direction ``x / ||x||`` instead (the
  variance along a direction); then a text with a tiny residual can win, and
  once the remaining space is one-dimensional every text ties.
* The rank-reduction basis comes from the *centred* outputs (the public code
  takes the SVD of the uncentred outputs).
* Chosen texts are never chosen again, and texts whose residual norm drops
  below ``tol`` times their input norm are skipped (their direction is noise).
  If no text is left, the search stops early with fewer than k picks.

``textspan`` (the fast version) never touches the N x T projections: it forms
the D x D covariance once, takes its top eigenvectors for the rank reduction,
and then works in the r-dimensional reduced coordinates, where each iteration
costs O(T r).  ``direct_textspan`` is a literal implementation of the greedy
definition on the data, used as the reference in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TextSpanResult", "textspan", "textspan_heads", "direct_textspan"]


@dataclass
class TextSpanResult:
    """Output of TextSpan for one head.

    Attributes:
        indices: chosen text indices (rows of the input ``X``), in order.
        explained_variance: ``[k]`` variance of the (deflated) outputs along each
            chosen direction, i.e. the variance added by each pick.
        cumulative_fraction: ``[k]`` cumulative explained variance divided by
            ``total_variance``; non-decreasing and <= 1.
        basis: ``[k, D]`` orthonormal directions u, in the order chosen.
        mean: ``[D]`` mean of the head's outputs over the images.
        total_variance: ``trace(cov(C))`` of the head's outputs (population).
    """

    indices: list[int]
    explained_variance: Tensor
    cumulative_fraction: Tensor
    basis: Tensor
    mean: Tensor
    total_variance: float

    def coefficients(self, C: Tensor) -> Tensor:
        """Coordinates of ``C - mean`` in the basis: ``[N, D] -> [N, k]``."""
        B = self.basis.to(C.device, torch.float64)
        out = (C.to(torch.float64) - self.mean.to(C.device)) @ B.T
        return out.to(C.dtype)

    def reconstruct(self, C: Tensor) -> Tensor:
        """Project ``C`` onto ``mean + span(basis)``: ``[N, D] -> [N, D]``."""
        B = self.basis.to(C.device, torch.float64)
        mean = self.mean.to(C.device)
        out = mean + ((C.to(torch.float64) - mean) @ B.T) @ B
        return out.to(C.dtype)


def _check_inputs(C: Tensor, X: Tensor, k: int, rank: int | None, tol: float,
                  rank_rtol: float) -> None:
    if C.ndim != 2:
        raise ValueError(f"head outputs C must be [N, D], got shape {tuple(C.shape)}")
    if X.ndim != 2:
        raise ValueError(f"texts X must be [T, D], got shape {tuple(X.shape)}")
    if C.shape[0] < 1:
        raise ValueError("head outputs C are empty (N = 0 images)")
    if X.shape[0] < 1:
        raise ValueError("texts X are empty (T = 0 candidate texts)")
    if C.shape[1] != X.shape[1]:
        raise ValueError(
            f"embedding dims differ: outputs C have D={C.shape[1]}, texts X have D={X.shape[1]}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of texts to choose) must be an int >= 1, got {k!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None or an int >= 1, got {rank!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not rank_rtol >= 0:
        raise ValueError(f"rank_rtol must be >= 0, got {rank_rtol!r}")


def _finish(indices: list[int], ev: list[Tensor], basis: list[Tensor], mean: Tensor,
            total: Tensor, D: int) -> TextSpanResult:
    dev = mean.device
    ev_t = torch.stack(ev) if ev else torch.zeros(0, dtype=torch.float64, device=dev)
    basis_t = torch.stack(basis) if basis else torch.zeros(0, D, dtype=torch.float64, device=dev)
    total_f = float(total)
    frac = ev_t.cumsum(0) / total_f if total_f > 0 else torch.zeros_like(ev_t)
    return TextSpanResult(indices, ev_t, frac, basis_t, mean, total_f)


def textspan(C: Tensor, X: Tensor, k: int = 60, rank: int | None = 80, *,
             normalize: bool = False, tol: float = 1e-8,
             rank_rtol: float = 1e-10) -> TextSpanResult:
    """Fast TextSpan for one head (covariance-based, O(T r) per iteration).

    Args:
        C: ``[N, D]`` the head's direct contributions over N images.
        X: ``[T, D]`` candidate text embeddings (unit-normalised by the caller).
        k: number of texts to choose.
        rank: keep the top-``rank`` principal directions of the outputs and
            project the texts onto them; ``None`` or ``>= D`` skips this.
        normalize: score a text along its unit direction rather than along its
            unnormalised residual x (the default, as the paper's public code does).
        tol: texts whose residual norm is below ``tol * ||x_input||`` are skipped.
        rank_rtol: in the rank reduction, drop principal directions whose
            variance is <= ``rank_rtol`` times the largest (numerical null
            space).  Raise it (e.g. 1e-6) for outputs computed in half precision.

    Returns:
        A :class:`TextSpanResult` (float64 tensors on ``C``'s device).
    """
    _check_inputs(C, X, k, rank, tol, rank_rtol)
    N, D = C.shape
    C64 = C.to(torch.float64)
    mean = C64.mean(0)
    C0 = C64 - mean
    sigma = C0.T @ C0 / N  # [D, D]
    total = sigma.diagonal().sum()
    del C0, C64

    X64 = X.to(device=C.device, dtype=torch.float64)
    thr2 = (tol * X64.norm(dim=1)) ** 2  # [T] skip threshold on squared residual norms
    if rank is not None and rank < D:
        evals, evecs = torch.linalg.eigh(sigma)
        lam = evals[-rank:].flip(0)  # [r]; in these coordinates the covariance is diag(lam)
        keep = lam > rank_rtol * lam[0].clamp_min(0)
        lam = lam[keep]
        V = evecs[:, -rank:].flip(1)[:, keep]  # [D, r] top eigenvectors = top right-sing. vectors of C0
        Y = X64 @ V  # [T, r] texts in the reduced coordinates
        M = Y * lam  # [T, r] = Y Sigma_r
        cov_times = lambda u: lam * u  # noqa: E731
    else:
        V = None
        Y = X64.clone()
        M = Y @ sigma
        cov_times = lambda u: sigma @ u  # noqa: E731

    # Texts are kept orthogonal to every chosen u, so the score of a residual y
    # under the deflated covariance P Sigma P equals y^T Sigma y for the original
    # Sigma: M = Y Sigma only needs the rank-1 update M -= (Y u) (Sigma u)^T.
    available = torch.ones(X.shape[0], dtype=torch.bool, device=C.device)
    indices: list[int] = []
    ev: list[Tensor] = []
    basis: list[Tensor] = []
    for _ in range(k):
        n2 = torch.einsum("tr,tr->t", Y, Y)
        q = torch.einsum("tr,tr->t", M, Y)  # y^T Sigma y
        score = q / n2 if normalize else q
        score = score.masked_fill(~available | (n2 <= thr2) | (n2 == 0), float("-inf"))
        j = int(score.argmax())
        if score[j] == float("-inf"):
            break  # nothing usable left
        u = Y[j] / n2[j].sqrt()
        if basis:  # re-orthogonalise against earlier picks (guards against drift)
            Bm = torch.stack(basis)
            u = u - (Bm @ u) @ Bm
            u = u / u.norm()
        s = cov_times(u)
        a = Y @ u
        Y.addr_(a, u, alpha=-1)  # Y <- Y - a u^T, in place
        M.addr_(a, s, alpha=-1)
        available[j] = False
        indices.append(j)
        ev.append(u @ s)
        basis.append(u)

    result = _finish(indices, ev, basis, mean, total, Y.shape[1])
    if V is not None:
        result.basis = result.basis @ V.T  # back to [k, D]
    return result


def direct_textspan(C: Tensor, X: Tensor, k: int = 60, rank: int | None = 80, *,
                    normalize: bool = False, tol: float = 1e-8,
                    rank_rtol: float = 1e-10) -> TextSpanResult:
    """Reference TextSpan: literally projects the ``[N, D]`` outputs and all texts.

    Same arguments and result as :func:`textspan`, but every iteration recomputes
    the variances from the (deflated) data, costing O(N T D).  The rank
    reduction uses an SVD of the centred data.  Meant for tests only.
    """
    _check_inputs(C, X, k, rank, tol, rank_rtol)
    N, D = C.shape
    C64 = C.to(torch.float64)
    mean = C64.mean(0)
    C0 = C64 - mean
    total = C0.pow(2).sum() / N
    X64 = X.to(device=C.device, dtype=torch.float64)
    thr2 = (tol * X64.norm(dim=1)) ** 2
    if rank is not None and rank < D:
        _, S, Vh = torch.linalg.svd(C0, full_matrices=False)
        keep = S[:rank] ** 2 > rank_rtol * S[0] ** 2
        Vr = Vh[:rank][keep].T  # [D, r]
        X64 = X64 @ Vr @ Vr.T

    available = torch.ones(X.shape[0], dtype=torch.bool, device=C.device)
    indices: list[int] = []
    ev: list[Tensor] = []
    basis: list[Tensor] = []
    for _ in range(k):
        n2 = (X64 * X64).sum(1)
        dirs = X64 / n2.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[:, None]
        proj = C0 @ (dirs if normalize else X64).T  # [N, T]
        score = proj.var(dim=0, unbiased=False)
        score = score.masked_fill(~available | (n2 <= thr2) | (n2 == 0), float("-inf"))
        j = int(score.argmax())
        if score[j] == float("-inf"):
            break
        u = dirs[j]
        c = C0 @ u
        ev.append(c.var(unbiased=False))
        C0 = C0 - torch.outer(c, u)
        X64 = X64 - torch.outer(X64 @ u, u)
        available[j] = False
        indices.append(j)
        basis.append(u)
    return _finish(indices, ev, basis, mean, total, D)


def textspan_heads(
    contribs: Tensor | Mapping[tuple[int, int], Tensor],
    texts: Tensor,
    k: int = 60,
    rank: int | None = 80,
    *,
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    tol: float = 1e-8,
    rank_rtol: float = 1e-10,
) -> dict[tuple[int, int], TextSpanResult]:
    """Run :func:`textspan` on many heads.

    Args:
        contribs: either ``[N, L, H, D]`` per-head direct contributions, or a
            mapping ``(layer, head) -> [N, D]``.
        texts: ``[T, D]`` candidate text embeddings.
        k, rank, normalize, tol, rank_rtol: as in :func:`textspan`.
        layers: for a tensor input, the layer label of each of the L slices
            (e.g. ``[20, 21, 22, 23]``); defaults to ``0..L-1``.

    Returns:
        ``{(layer, head): TextSpanResult}``.
    """
    if isinstance(contribs, Mapping):
        items = dict(contribs)
    else:
        if contribs.ndim != 4:
            raise ValueError(
                f"contribs must be [N, L, H, D] or a dict of [N, D], got shape {tuple(contribs.shape)}"
            )
        L, H = contribs.shape[1], contribs.shape[2]
        labels = list(range(L)) if layers is None else list(layers)
        if len(labels) != L:
            raise ValueError(f"layers has {len(labels)} labels for L={L} layers")
        items = {(labels[li], h): contribs[:, li, h] for li in range(L) for h in range(H)}
    texts = texts.to(torch.float64)  # convert once, not per head
    return {key: textspan(c, texts, k, rank, normalize=normalize, tol=tol, rank_rtol=rank_rtol)
            for key, c in items.items()}
