"""Where the toy model writes its image embedding: a training term that moves the
direct effect into the late attention layers, as in the real CLIP models of the paper.

The paper's analysis rests on a measured fact about CLIP-ViTs (Section 3): mean-ablating
the direct effects of all MLPs and of all but the last 4 attention layers costs little
accuracy, so the late attention heads carry the image representation. A 6-layer toy
model trained with the contrastive loss alone does not behave like that: its MLPs and
its first two attention layers write colour, shape, texture and image position straight
into the class token, and its late heads carry only count and background (measured in
``docs/toyworld-training.md``). TextSpan cannot give a late head a role that no late
head has, so the toy model would not test it.

:func:`early_direct_share` measures, on a batch, the share of the normalised image
embedding's variance that comes directly from those other paths (embedding term,
every MLP, attention layers before the last ``late_layers``); training adds
``weight * share`` to the loss (``train.py --direct-penalty``). The term says nothing about
*which* late head should carry what, so head roles stay a test of TextSpan.

Notation: ``B`` images, ``C`` residual writes at the class token (the embedding term,
then attention and MLP of each layer in order), ``W`` width, ``D`` embedding size.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..decomposition import center, ln_stats


def write_names(n_layers: int) -> list[str]:
    """Names of the ``C = 1 + 2 L`` class-token writes, in the order of :class:`ClassTokenWrites`."""
    return ["embed"] + [f"{kind}{l}" for l in range(n_layers) for kind in ("attn", "mlp")]


def penalised_writes(n_layers: int, late_layers: int) -> torch.Tensor:
    """``[C]`` bool: the embedding term, every MLP, and attention layers before the last ``late_layers``."""
    if not 0 <= late_layers <= n_layers:
        raise ValueError(f"late_layers must be in [0, {n_layers}], got {late_layers}")
    first_late = n_layers - late_layers
    return torch.tensor([True] + [flag for l in range(n_layers) for flag in (l < first_late, True)])


def direct_contributions(writes: torch.Tensor, gamma: torch.Tensor, eps: float,
                         proj: Optional[torch.Tensor]) -> torch.Tensor:
    """Direct contributions of residual writes to the image embedding, ``ln_post`` folded per image.

    Args:
        writes: ``[B, C, W]`` the writes to the class token's residual stream; their sum
            over ``C`` is the stream that ``ln_post`` normalises.
        gamma: ``ln_post.weight`` ``[W]``; eps: ``ln_post.eps``; proj: ``[W, D]`` or ``None``.

    Returns:
        ``[B, C, D]``: ``(center(write) * gamma / sigma) @ proj``. Their sum over ``C`` plus
        ``ln_post.bias @ proj`` is the image embedding.
    """
    _, sigma = ln_stats(writes.sum(1), eps)
    out = center(writes) * gamma / sigma[:, None, None]
    return out if proj is None else out @ proj


def early_direct_share(contributions: torch.Tensor, penalised: torch.Tensor,
                       embedding: torch.Tensor) -> torch.Tensor:
    """Share of the variance of the normalised embedding written directly by the penalised paths.

    Args:
        contributions: ``[B, C, D]`` from :func:`direct_contributions`.
        penalised: ``[C]`` bool, e.g. :func:`penalised_writes`.
        embedding: ``[B, D]`` the image embeddings (unnormalised).

    Returns:
        Scalar ``sum_{c penalised} Var(x_c) / Var(e)``, with ``x_c = contribution_c / |embedding|``,
        ``e = embedding / |embedding|``, and ``Var`` the batch variance summed over ``D``.
        A sum of variances, not of covariances, so that no path can lower it by writing
        against another; it can exceed 1 when the paths cancel each other.
    """
    norm = embedding.norm(dim=-1, keepdim=True)
    x = contributions[:, penalised] / norm[:, None]
    e = embedding / norm
    var_x = (x - x.mean(0)).pow(2).sum(-1).mean(0).sum()
    var_e = (e - e.mean(0)).pow(2).sum(-1).mean()
    return var_x / var_e.clamp_min(1e-12)


class ClassTokenWrites:
    """Records the class token's residual writes ``[B, C, W]`` during a forward pass of an
    open_clip ``VisionTransformer`` (class-token pooling, no attention pooler) with hooks.

    Use as ``with ClassTokenWrites(model.visual) as rec: model(...)``; then ``rec.writes()``.
    The tensors keep their autograd graph, so a loss on them trains the model.
    """

    def __init__(self, visual: torch.nn.Module) -> None:
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("ClassTokenWrites needs class-token pooling without an attention pooler")
        if getattr(visual, "final_ln_after_pool", False):
            raise ValueError("ClassTokenWrites needs ln_post before pooling (final_ln_after_pool=False)")
        self.visual = visual
        self._batch_first = getattr(visual.transformer, "batch_first", True)
        self._writes: list[torch.Tensor] = []
        self._handles: list = []

    def _cls(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self._batch_first else x[0]

    def __enter__(self) -> "ClassTokenWrites":
        self._writes = []

        def pre(module, args):  # the transformer's input is always [B, N, W] (it transposes itself)
            self._writes.append(args[0][:, 0])

        def post(module, args, output):
            self._writes.append(self._cls(output))

        self._handles = [self.visual.transformer.register_forward_pre_hook(pre)]
        for block in self.visual.transformer.resblocks:
            self._handles += [block.ls_1.register_forward_hook(post), block.ls_2.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def writes(self) -> torch.Tensor:
        """``[B, C, W]`` in the order of :func:`write_names` (one forward pass recorded)."""
        expected = 1 + 2 * len(self.visual.transformer.resblocks)
        if len(self._writes) != expected:
            raise RuntimeError(f"recorded {len(self._writes)} writes, expected {expected}: run exactly one forward pass")
        return torch.stack(self._writes, dim=1)


def direct_share_of_model(visual: torch.nn.Module, rec: ClassTokenWrites, late_layers: int) -> torch.Tensor:
    """:func:`early_direct_share` of the forward pass recorded in ``rec``."""
    ln = visual.ln_post
    contrib = direct_contributions(rec.writes(), ln.weight, ln.eps, visual.proj)
    bias = ln.bias if visual.proj is None else ln.bias @ visual.proj
    mask = penalised_writes(len(visual.transformer.resblocks), late_layers).to(contrib.device)
    return early_direct_share(contrib, mask, contrib.sum(1) + bias)
