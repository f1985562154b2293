"""Repair front end: remove a spurious cue from a CLIP model by mean-ablating the
attention heads whose TextSpan role carries it (Gandelsman et al., ICLR 2024, Sec. 4.2).

* :mod:`repair.select`: choose heads (role queries over TextSpan results, or ``L.H`` lists).
* :mod:`repair.bake`: means over a split; exact repair (in the decomposition) and baked
  repair (a stock open_clip model whose weights realise the ablation); their agreement.
* :mod:`repair.export`: open_clip hub-layout folder with provenance and model card; Hub push.
* :mod:`repair.waterbirds_eval`: zero-shot Waterbirds group accuracies of all variants.
* :mod:`repair.cli`: ``clipdecomp repair`` and ``clipdecomp waterbirds-eval``.

Submodules are imported on use (``import repair`` stays cheap).
"""
