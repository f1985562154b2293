"""Exact decomposition of a CLIP-ViT image embedding into per-layer, per-head and
per-token contributions (Gandelsman, Efros & Steinhardt, ICLR 2024).

Notation: ``B`` images, ``L`` layers, ``H`` heads per layer, ``dh`` head width,
``W = H * dh`` residual width, ``N`` tokens (class token at index 0, then the
``gh x gw`` patches in row-major order), ``D`` joint image-text dimension, ``T``
texts.

The math
--------
With class-token pooling the image embedding is ``ln_post(r) @ proj`` where ``r`` is
the residual stream at the class token after the last layer::

    r = e + sum_l attn_l + sum_l mlp_l,          attn_l = sum_h head_{l,h}

(``e`` the class token after ``ln_pre``). ``ln_post(r) = gamma * C(r) / sigma + beta``
with ``C(x) = x - mean(x)`` (over the width) and ``sigma = sqrt(var(r) + eps)`` the
image's own standard deviation. ``C`` is linear, so it distributes over the terms;
``sigma`` is a per-image scalar computed once from the full ``r``. Each term ``p``
therefore contributes, in the joint space::

    (gamma * C(p) / sigma + beta / n_terms) @ proj,      n_terms = 1 + L + L*H

i.e. the LayerNorm bias is spread evenly over the ``1 + L + L*H`` terms (embedding,
MLPs, heads). The terms sum exactly to ``model.encode_image(images)`` (unnormalised).

Choice of centring: the reference implementation spreads the *mean* evenly over the
terms (``p - mean(r) / n_terms``). Here each term is centred by its own mean
(``C(p)``). Both are exact; per-term centring makes every contribution depend on the
other terms only through ``sigma``, and keeps the head level and the token level
consistent (a head's token contributions sum to the head's contribution) without
deciding how to apportion a shared mean among tokens.

A head ``h`` of layer ``l`` writes ``(z_h @ W_o[:, h]^T + b_o / H) * ls_1`` where ``z_h``
is its attention output at the class token before ``out_proj``, ``W_o[:, h]`` its
``dh`` columns of ``out_proj.weight``, ``b_o`` the ``out_proj`` bias (split evenly over
heads) and ``ls_1`` the layer scale (ones without). So the head contribution is
``z_h @ W_eff[l, h] / sigma + (bias share)`` with the per-head effective matrix
``W_eff[l, h] = C(W_o[:, h]^T * ls_1) * gamma @ proj`` of shape ``[dh, D]``.
Per source token ``j``: ``z_h = sum_j A[h, j] v[j, h]`` (class-token attention
probabilities ``A``, values ``v``), and the bias shares are split evenly over the
``N`` tokens.

All contractions with text embeddings go through ``W_eff @ texts^T`` (``[H, dh, T]``)
so that ``[B, L, N, H, D]`` is never materialised.

The forward pass is written with the model's own modules (``conv1``, ``ln_pre``,
``ln_1``, ``mlp``, ...) and parameters and uses
``torch.nn.functional.scaled_dot_product_attention`` for all queries, so its cost is
that of ``encode_image``; the class-token attention row is recomputed separately
(``O(N)`` per head), and the last layer is evaluated at the class token only (the
other tokens of the last layer do not reach the pooled output). Vision towers pass
no attention mask, so none is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, LayerScale, VisionTransformer
from torch import nn

from .errors import InputError
from .loading import vision_tower

__all__ = ["Decomposition", "decompose", "ln_stats", "center", "head_readout_matrices"]

TokenLayers = Union[str, Sequence[int], None]


# ----------------------------------------------------------------------------------------
# Pure tensor functions
# ----------------------------------------------------------------------------------------


def center(x: torch.Tensor) -> torch.Tensor:
    """``x - mean(x)`` over the last dimension (the linear part of a LayerNorm)."""
    return x - x.mean(dim=-1, keepdim=True)


def ln_stats(r: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm statistics of ``r [B, W]``: ``(mean [B], sigma [B])``, ``sigma = sqrt(var + eps)``."""
    mean = r.mean(dim=-1)
    var = r.var(dim=-1, unbiased=False)
    return mean, torch.sqrt(var + eps)


def head_readout_matrices(
    out_weight: torch.Tensor,
    ls_gamma: torch.Tensor,
    head_scale: torch.Tensor,
    ln_gamma: torch.Tensor,
) -> torch.Tensor:
    """Per-head maps from the attention output at one position to the (centred,
    ``gamma``-scaled) residual write, before ``/ sigma`` and ``@ proj``.

    Args:
        out_weight: ``out_proj.weight`` ``[W, W]``.
        ls_gamma: layer scale ``[W]`` (ones without layer scale).
        head_scale: per-head scale ``[H]`` (ones without ``scale_heads``).
        ln_gamma: ``ln_post.weight`` ``[W]``.

    Returns:
        ``[H, dh, W]`` ``M`` such that ``gamma * C(write of head h) = z_h @ M[h]`` (bias excluded).
    """
    W = out_weight.shape[0]
    H = head_scale.shape[0]
    m = out_weight.t().reshape(H, W // H, W) * ls_gamma * head_scale[:, None, None]
    return center(m) * ln_gamma


def _project(x: torch.Tensor, proj: Optional[torch.Tensor]) -> torch.Tensor:
    return x if proj is None else x @ proj


# ----------------------------------------------------------------------------------------
# Readout parameters
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Readout:
    """The model parameters needed to contract stored activations, in compute dtype.

    Tensors are detached views of the model's parameters when the dtype matches
    (no copy): do not modify the model's weights in place while using a Decomposition.
    """

    gamma: torch.Tensor  # [W]   ln_post.weight
    beta: torch.Tensor  # [W]    ln_post.bias
    eps: float
    proj: Optional[torch.Tensor]  # [W, D] or None
    out_weight: tuple[torch.Tensor, ...]  # L x [W, W]
    out_bias: torch.Tensor  # [L, W]
    ls_gamma: torch.Tensor  # [L, W]
    head_scale: torch.Tensor  # [L, H]

    @staticmethod
    def from_visual(visual: VisionTransformer, dtype: torch.dtype) -> "_Readout":
        W = visual.transformer.width
        dev = visual.conv1.weight.device
        ones = torch.ones(W, dtype=dtype, device=dev)
        zeros = torch.zeros(W, dtype=dtype, device=dev)

        def cast(t: Optional[torch.Tensor], default: torch.Tensor) -> torch.Tensor:
            return default if t is None else t.detach().to(dtype)

        ln = visual.ln_post
        out_w, out_b, ls, hs = [], [], [], []
        for blk in visual.transformer.resblocks:
            attn = blk.attn
            H = attn.num_heads
            out_w.append(attn.out_proj.weight.detach().to(dtype))
            out_b.append(cast(attn.out_proj.bias, zeros))
            ls.append(cast(blk.ls_1.gamma, ones) if isinstance(blk.ls_1, LayerScale) else ones)
            scale = getattr(attn, "head_scale", None)
            hs.append(
                torch.ones(H, dtype=dtype, device=dev) if scale is None else scale.detach().to(dtype).reshape(H)
            )
        return _Readout(
            gamma=cast(ln.weight, ones),
            beta=cast(ln.bias, zeros),
            eps=float(ln.eps),
            proj=None if visual.proj is None else visual.proj.detach().to(dtype),
            out_weight=tuple(out_w),
            out_bias=torch.stack(out_b),
            ls_gamma=torch.stack(ls),
            head_scale=torch.stack(hs),
        )


# ----------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------


class Decomposition:
    """Stored activations of one batch and the contractions that read them out.

    All parts live in the joint image-text space, *unnormalised*: they sum to
    ``model.encode_image(images)`` (see :meth:`total`). The parts of the L2-normalised
    embedding are ``part / norm`` (:attr:`norm`, :meth:`normalized`).

    Built by :func:`decompose`; do not instantiate directly.
    """

    def __init__(
        self,
        *,
        embed_raw: torch.Tensor,
        mlp_raw: torch.Tensor,
        z: torch.Tensor,
        attn: torch.Tensor,
        values: dict[int, torch.Tensor],
        ln_mean: torch.Tensor,
        sigma: torch.Tensor,
        readout: _Readout,
        grid: tuple[int, int],
    ) -> None:
        self._e = embed_raw  # [B, W]
        self._m = mlp_raw  # [B, L, W]
        self._z = z  # [B, L, H, dh]
        self._a = attn  # [B, L, H, N]
        self._v = values  # {layer: [B, N, H, dh]}
        self._ln_mean = ln_mean  # [B]
        self._sigma = sigma  # [B]
        self._r = readout
        self._grid = grid
        self._weff: dict[int, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}
        B, L, H, dh = z.shape
        self._B, self._L, self._H, self._dh = B, L, H, dh
        self._N = attn.shape[-1]
        self._W = H * dh
        self._D = self._W if readout.proj is None else readout.proj.shape[1]
        self._n_terms = 1 + L + L * H
        self._beta_p = _project(readout.beta, readout.proj)  # [D]
        # out_proj bias (times layer scale), centred and scaled, per layer: [L, W] and [L, D]
        self._bias_w = center(readout.out_bias * readout.ls_gamma) * readout.gamma
        self._bias_p = _project(self._bias_w, readout.proj)

    # ------------------------------------------------------------------ metadata
    @property
    def batch_size(self) -> int:
        """``B``."""
        return self._B

    @property
    def layers(self) -> int:
        """Number of layers ``L``."""
        return self._L

    @property
    def n_heads(self) -> int:
        """Heads per layer ``H``."""
        return self._H

    @property
    def head_dim(self) -> int:
        """``dh``."""
        return self._dh

    @property
    def n_tokens(self) -> int:
        """``N = 1 + gh * gw`` tokens; index 0 is the class token."""
        return self._N

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(gh, gw)``: token ``1 + i * gw + j`` is the patch at row ``i``, column ``j``."""
        return self._grid

    @property
    def width(self) -> int:
        """Residual width ``W``."""
        return self._W

    @property
    def embed_dim(self) -> int:
        """Joint-space dimension ``D``."""
        return self._D

    @property
    def n_terms(self) -> int:
        """``1 + L + L*H``: the number of terms the ``ln_post`` bias is spread over."""
        return self._n_terms

    @property
    def token_layers(self) -> tuple[int, ...]:
        """Layers whose per-token values are stored (for the token-level methods)."""
        return tuple(sorted(self._v))

    @property
    def dtype(self) -> torch.dtype:
        return self._z.dtype

    @property
    def device(self) -> torch.device:
        return self._z.device

    @property
    def class_attention(self) -> torch.Tensor:
        """Attention probabilities of the class-token query ``[B, L, H, N]``."""
        return self._a

    @property
    def head_outputs(self) -> torch.Tensor:
        """Each head's attention output at the class token, before ``out_proj`` ``[B, L, H, dh]``
        (``z``: ``heads[:, l, h]`` is ``z[:, l, h] @ effective_weights(l)[h] / sigma`` plus the bias shares)."""
        return self._z

    @property
    def sigma(self) -> torch.Tensor:
        """Per-image ``ln_post`` scale ``sqrt(var(r) + eps)`` ``[B]``."""
        return self._sigma

    @property
    def ln_mean(self) -> torch.Tensor:
        """Per-image mean of the final class-token residual ``[B]`` (removed by centring)."""
        return self._ln_mean

    # ------------------------------------------------------------------ helpers
    def _head_matrix(self, layer: int) -> torch.Tensor:
        """``[H, dh, W]``: attention output -> centred, gamma-scaled write (before proj)."""
        r = self._r
        return head_readout_matrices(r.out_weight[layer], r.ls_gamma[layer], r.head_scale[layer], r.gamma)

    def effective_weights(self, layer: int) -> torch.Tensor:
        """``W_eff[layer]`` ``[H, dh, D]``: maps a head's attention output at the class
        token to its joint-space contribution (before ``/ sigma``; bias excluded). Cached."""
        layer = self._layer(layer)
        if layer not in self._weff:
            self._weff[layer] = _project(self._head_matrix(layer), self._r.proj)
        return self._weff[layer]

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"layer must be an int in [-{self._L}, {self._L}), got {layer!r}.")
        if not -self._L <= layer < self._L:
            raise InputError(f"layer {layer} is out of range for a model with {self._L} layers.")
        return layer % self._L

    def _token_layers(self, layers: Optional[Iterable[int]]) -> list[int]:
        if layers is None:
            return list(self.token_layers)
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for layer in layers:
            ll = self._layer(layer)
            if ll not in self._v:
                raise InputError(
                    f"layer {layer} has no token-level data; this decomposition stored "
                    f"token_layers={list(self.token_layers)}. Pass token_layers=... to decompose()."
                )
            out.append(ll)
        return out

    def _texts(self, texts: torch.Tensor) -> torch.Tensor:
        if not isinstance(texts, torch.Tensor):
            raise InputError(f"texts must be a torch.Tensor [T, {self._D}], got {type(texts).__name__}.")
        if texts.ndim != 2 or texts.shape[1] != self._D:
            raise InputError(
                f"texts must have shape [T, {self._D}] (text embeddings in the joint space), "
                f"got {list(texts.shape)}."
            )
        return texts.to(device=self.device, dtype=self.dtype)

    def _per_image(self, x: torch.Tensor) -> torch.Tensor:
        """Divide by sigma along the batch dimension."""
        return x / self._sigma.view(-1, *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------ parts [.., D]
    @property
    def embed(self) -> torch.Tensor:
        """Contribution of the class token after ``ln_pre`` (the direct path) ``[B, D]``."""
        if "embed" not in self._cache:
            r = self._r
            p = _project(center(self._e) * r.gamma, r.proj)
            self._cache["embed"] = self._per_image(p) + self._beta_p / self._n_terms
        return self._cache["embed"]

    @property
    def mlps(self) -> torch.Tensor:
        """Contribution of each MLP at the class token ``[B, L, D]``."""
        if "mlps" not in self._cache:
            r = self._r
            p = _project(center(self._m) * r.gamma, r.proj)
            self._cache["mlps"] = self._per_image(p) + self._beta_p / self._n_terms
        return self._cache["mlps"]

    @property
    def heads(self) -> torch.Tensor:
        """Contribution of each attention head, summed over source tokens ``[B, L, H, D]``."""
        if "heads" not in self._cache:
            out = torch.empty(self._B, self._L, self._H, self._D, dtype=self.dtype, device=self.device)
            for l in range(self._L):
                if l in self._weff or self._B > self._dh:  # cheaper to build W_eff once
                    p = torch.einsum("bhd,hde->bhe", self._z[:, l], self.effective_weights(l))
                else:
                    w = torch.einsum("bhd,hdw->bhw", self._z[:, l], self._head_matrix(l))
                    p = _project(w, self._r.proj)
                out[:, l] = self._per_image(p + self._bias_p[l] / self._H)
            out += self._beta_p / self._n_terms
            self._cache["heads"] = out
        return self._cache["heads"]

    def total(self) -> torch.Tensor:
        """The image embedding ``[B, D]`` = embed + sum of MLPs + sum of heads
        = ``model.encode_image(images)`` (unnormalised), without materialising the heads."""
        if "total" not in self._cache:
            r = self._r
            w = center(self._e) * r.gamma + (center(self._m) * r.gamma).sum(1) + self._bias_w.sum(0)
            for l in range(self._L):
                w = w + self._z[:, l].reshape(self._B, self._W) @ self._head_matrix(l).reshape(self._W, self._W)
            self._cache["total"] = self._per_image(_project(w, r.proj)) + self._beta_p
        return self._cache["total"]

    @property
    def norm(self) -> torch.Tensor:
        """``||total()||`` per image ``[B]``. The parts of the *normalised* embedding
        ``total / norm`` are ``part / norm`` (see :meth:`normalized`)."""
        if "norm" not in self._cache:
            self._cache["norm"] = self.total().norm(dim=-1)
        return self._cache["norm"]

    def normalized(self, part: torch.Tensor) -> torch.Tensor:
        """``part / norm`` broadcast over the batch (first) dimension: the part's share of
        the unit-norm embedding. Works for any ``[B, ...]`` part or score tensor."""
        if not isinstance(part, torch.Tensor) or part.ndim < 1 or part.shape[0] != self._B:
            shape = list(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise InputError(f"normalized() expects a tensor [B={self._B}, ...], got {shape}.")
        return part / self.norm.view(-1, *([1] * (part.ndim - 1))).to(part.dtype)

    # ------------------------------------------------------------------ token level [.., D]
    def head_tokens(self, layer: int) -> torch.Tensor:
        """Contribution of every (source token, head) of ``layer`` ``[B, N, H, D]``
        (token 0 is the class token). Sums over tokens to ``heads[:, layer]``.
        Only for layers in :attr:`token_layers`."""
        (l,) = self._token_layers([layer])
        av = self._v[l] * self._a[:, l].transpose(1, 2).unsqueeze(-1)  # [B, N, H, dh]
        out = torch.einsum("bnhd,hde->bnhe", av, self.effective_weights(l))
        out = self._per_image(out + self._bias_p[l] / (self._H * self._N))
        return out + self._beta_p / (self._n_terms * self._N)

    def tokens(self, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Contribution of each source token through the attention of ``layers``
        (default: all :attr:`token_layers`), summed over heads and layers ``[B, N, D]``.
        Index 0 is the class token (its attention to itself); MLPs and the embedding are
        not included."""
        ls = self._token_layers(layers)
        out = torch.zeros(self._B, self._N, self._D, dtype=self.dtype, device=self.device)
        for l in ls:
            av = (self._v[l] * self._a[:, l].transpose(1, 2).unsqueeze(-1)).reshape(self._B, self._N, self._W)
            out += self._per_image(av @ self.effective_weights(l).reshape(self._W, self._D) + self._bias_p[l] / self._N)
        return out + len(ls) * self._H * self._beta_p / (self._n_terms * self._N)

    # ------------------------------------------------------------------ scores [.., T]
    def embed_scores(self, texts: torch.Tensor) -> torch.Tensor:
        """``embed @ texts^T`` ``[B, T]``."""
        return self.embed @ self._texts(texts).t()

    def mlp_scores(self, texts: torch.Tensor) -> torch.Tensor:
        """``mlps @ texts^T`` ``[B, L, T]``."""
        return self.mlps @ self._texts(texts).t()

    def total_scores(self, texts: torch.Tensor) -> torch.Tensor:
        """``total() @ texts^T`` ``[B, T]``."""
        return self.total() @ self._texts(texts).t()

    def _text_readout(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text-side factors: ``proj @ t^T`` ``[W, T]``, out_proj-bias scores ``[L, T]``,
        ln_post-bias score ``[T]``."""
        pt = t.t() if self._r.proj is None else self._r.proj @ t.t()
        return pt, self._bias_w @ pt, self._r.beta @ pt

    def head_scores(self, texts: torch.Tensor) -> torch.Tensor:
        """``heads @ texts^T`` ``[B, L, H, T]``, computed via ``W_eff @ texts^T``."""
        t = self._texts(texts)
        pt, bias_t, beta_t = self._text_readout(t)
        out = torch.empty(self._B, self._L, self._H, t.shape[0], dtype=self.dtype, device=self.device)
        for l in range(self._L):
            wt = self._head_matrix(l) @ pt  # [H, dh, T]
            out[:, l] = self._per_image(torch.einsum("bhd,hdt->bht", self._z[:, l], wt) + bias_t[l] / self._H)
        return out + beta_t / self._n_terms

    def head_token_scores(self, texts: torch.Tensor, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``head_tokens(l) @ texts^T`` for each of ``layers`` (default: all
        :attr:`token_layers`) ``[B, len(layers), N, H, T]``, without materialising
        ``[B, N, H, D]``."""
        t = self._texts(texts)
        ls = self._token_layers(layers)
        pt, bias_t, beta_t = self._text_readout(t)
        out = torch.empty(self._B, len(ls), self._N, self._H, t.shape[0], dtype=self.dtype, device=self.device)
        for i, l in enumerate(ls):
            wt = self._head_matrix(l) @ pt  # [H, dh, T]
            s = torch.einsum("bnhd,hdt->bnht", self._v[l], wt) * self._a[:, l].transpose(1, 2).unsqueeze(-1)
            out[:, i] = self._per_image(s + bias_t[l] / (self._H * self._N))
        return out + beta_t / (self._n_terms * self._N)

    def token_scores(self, texts: torch.Tensor, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``tokens(layers) @ texts^T`` ``[B, N, T]`` (summed over heads and ``layers``)."""
        t = self._texts(texts)
        ls = self._token_layers(layers)
        pt, bias_t, beta_t = self._text_readout(t)
        out = torch.zeros(self._B, self._N, t.shape[0], dtype=self.dtype, device=self.device)
        for l in ls:
            wt = (self._head_matrix(l) @ pt).reshape(self._W, -1)  # [W, T]
            av = (self._v[l] * self._a[:, l].transpose(1, 2).unsqueeze(-1)).reshape(self._B, self._N, self._W)
            out += self._per_image(av @ wt + bias_t[l] / self._N)
        return out + len(ls) * self._H * beta_t / (self._n_terms * self._N)

    def __repr__(self) -> str:
        return (
            f"Decomposition(B={self._B}, L={self._L}, H={self._H}, N={self._N}, D={self._D}, "
            f"grid={self._grid}, token_layers={list(self.token_layers)}, dtype={self.dtype})"
        )


# ----------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------


def _normalize_token_layers(token_layers: TokenLayers, n_layers: int) -> tuple[int, ...]:
    if token_layers is None:
        return ()
    if isinstance(token_layers, str):
        if token_layers == "all":
            return tuple(range(n_layers))
        raise InputError(f"token_layers must be 'all', None or a sequence of layer indices, got {token_layers!r}.")
    if isinstance(token_layers, (int, bool)):
        raise InputError(
            f"token_layers must be 'all', None or a sequence of layer indices (e.g. [-4, -3, -2, -1]), "
            f"got the int {token_layers!r}."
        )
    out = set()
    for t in token_layers:
        if isinstance(t, bool) or not isinstance(t, int) or not -n_layers <= t < n_layers:
            raise InputError(f"token_layers entries must be ints in [-{n_layers}, {n_layers}), got {t!r}.")
        out.add(t % n_layers)
    return tuple(sorted(out))


def _check_images(images: Any, visual: VisionTransformer) -> torch.Tensor:
    H, W = visual.image_size
    expect = f"a preprocessed batch [B, 3, {H}, {W}] (floating point)"
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor, {expect}; got {type(images).__name__}. "
                         "Apply the model's preprocess to each image and torch.stack them.")
    if images.ndim != 4:
        hint = " (add a batch dimension: images[None])" if images.ndim == 3 else ""
        raise InputError(f"images must be 4-D, {expect}; got shape {list(images.shape)}{hint}.")
    if images.shape[0] < 1:
        raise InputError(f"images is an empty batch (B=0); expected {expect}.")
    if images.shape[1] != 3:
        raise InputError(f"images must have 3 channels (RGB), {expect}; got {images.shape[1]} channels.")
    if tuple(images.shape[2:]) != (H, W):
        raise InputError(
            f"images are {tuple(images.shape[2:])} but this model expects {(H, W)}: {expect}. "
            "Use the model's preprocess transform."
        )
    if not images.is_floating_point():
        raise InputError(f"images must be floating point, {expect}; got {images.dtype} "
                         "(use the preprocess transform, which also normalises).")
    if not bool(torch.isfinite(images).all()):
        raise InputError("images contain NaN or infinite values.")
    p = visual.conv1.weight
    return images.to(device=p.device, dtype=p.dtype)


def _embed_tokens(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + positions, patch dropout, ln_pre: ``[B, N, W]``."""
    x = visual.conv1(images)  # [B, W, gh, gw]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, gh*gw, W]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def _split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, N, W]`` -> ``[B, H, N, dh]``."""
    B, N, W = t.shape
    return t.view(B, N, n_heads, W // n_heads).transpose(1, 2)


def _attention(
    blk: nn.Module, x: torch.Tensor, cdt: torch.dtype, *, keep_values: bool, class_token_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One attention sub-block with the block's own modules and weights.

    Args:
        x: residual stream ``[B, N, W]``.
        class_token_only: evaluate only the class-token query (for the last layer, whose
            other outputs never reach the pooled embedding).

    Returns:
        ``(x + attention write)`` (``[B, N, W]``, or ``[B, W]`` at the class token when
        ``class_token_only``), the per-head output at the class token before ``out_proj``
        ``z [B, H, dh]``, the class-token attention probabilities ``[B, H, N]`` (in ``cdt``),
        and the values ``[B, N, H, dh]`` (in ``cdt``) if ``keep_values``.
    """
    attn = blk.attn
    B, N, W = x.shape
    H = attn.num_heads
    dh = W // H
    custom = isinstance(blk, CustomResidualAttentionBlock)
    head_scale = getattr(attn, "head_scale", None) if custom else None
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    h = blk.ln_1(x)
    if not class_token_only:
        q, k, v = (_split_heads(t, H) for t in F.linear(h, w_in, b_in).chunk(3, dim=-1))  # [B, H, N, dh]
        if custom:
            q, k = attn.ln_q(q), attn.ln_k(k)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, dh]
        q0 = q[:, :, 0]
    else:
        kv = F.linear(h, w_in[W:], None if b_in is None else b_in[W:])
        k, v = (_split_heads(t, H) for t in kv.chunk(2, dim=-1))
        q0 = F.linear(h[:, 0], w_in[:W], None if b_in is None else b_in[:W]).view(B, H, dh)
        if custom:
            q0, k = attn.ln_q(q0), attn.ln_k(k)
    # the class-token row of the attention probabilities, recomputed (O(N) per head)
    a = torch.softmax(torch.einsum("bhd,bhnd->bhn", q0.to(cdt), k.to(cdt)) * dh**-0.5, dim=-1)
    values = v.transpose(1, 2).to(dtype=cdt, copy=True) if keep_values else None  # [B, N, H, dh]
    if class_token_only:
        o = torch.einsum("bhn,bhnd->bhd", a.to(v.dtype), v)  # [B, H, dh]
        z = o
        x = x[:, 0]
    else:
        z = o[:, :, 0]
        o = o.transpose(1, 2)  # [B, N, H, dh]
    if head_scale is not None:
        o = o * head_scale.view(H, 1)
    x = x + blk.ls_1(attn.out_proj(o.reshape(*x.shape[:-1], W)))
    return x, z.to(dtype=cdt, copy=True), a, values


def decompose(model: Any, images: torch.Tensor, *, token_layers: TokenLayers = "all") -> Decomposition:
    """Run the image tower once and keep what is needed to decompose its output.

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel`, an open_clip CLIP model, or its
            ``VisionTransformer``; must be in eval mode.
        images: preprocessed batch ``[B, 3, H, W]`` with ``(H, W)`` the model's image size.
        token_layers: layers whose per-token values ``[B, N, H, dh]`` are kept for the
            token-level methods: ``"all"`` (default), a sequence of layer indices
            (negative indices count from the end), or ``None`` (head level only; the
            cheapest). Memory: ``B * N * W`` numbers per stored layer.

    Returns:
        A :class:`Decomposition`.

    Raises:
        InputError: malformed images, token_layers, or a model in training mode.
        UnsupportedModelError: the model's image tower cannot be decomposed.
    """
    visual = vision_tower(model)
    if visual.training:
        raise InputError("the model is in training mode (dropout / patch dropout active); call model.eval() first.")
    images = _check_images(images, visual)
    blocks = visual.transformer.resblocks
    L = len(blocks)
    keep_tokens = _normalize_token_layers(token_layers, L)
    model_dtype = visual.conv1.weight.dtype
    cdt = torch.promote_types(model_dtype, torch.float32)

    def keep(t: torch.Tensor) -> torch.Tensor:  # own copy, so the big tensor can be freed
        return t.to(dtype=cdt, copy=True)

    zs, attns, mlps, values = [], [], [], {}
    with torch.no_grad():
        x = _embed_tokens(visual, images)  # [B, N, W]
        embed_raw = keep(x[:, 0])
        for l, blk in enumerate(blocks):
            last = l == L - 1
            # the attention temporaries (qkv, probabilities, ...) die inside _attention,
            # before the MLP runs, as in the plain forward
            x, z, a, v = _attention(blk, x, cdt, keep_values=l in keep_tokens, class_token_only=last)
            zs.append(z)
            attns.append(a)
            if v is not None:
                values[l] = v
            y = blk.ls_2(blk.mlp(blk.ln_2(x)))  # [B, N, W], or [B, W] for the last layer
            mlps.append(keep(y if last else y[:, 0]))
            x = x + y
            del y
        ln_mean, sigma = ln_stats(x.to(cdt), float(visual.ln_post.eps))  # x: final class token [B, W]

    return Decomposition(
        embed_raw=embed_raw,
        mlp_raw=torch.stack(mlps, dim=1),
        z=torch.stack(zs, dim=1),
        attn=torch.stack(attns, dim=1),
        values=values,
        ln_mean=ln_mean,
        sigma=sigma,
        readout=_Readout.from_visual(visual, cdt),
        grid=(int(visual.grid_size[0]), int(visual.grid_size[1])),
    )
