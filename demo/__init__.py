"""The clipdecomp Gradio demo (``python app.py``).

Modules: :mod:`demo.limits` (input limits and checks), :mod:`demo.state` (the model and
caches), :mod:`demo.components` (Gradio glue), one module per tab with its plain
functions (:mod:`demo.heatmap_tab`, :mod:`demo.roles_tab`, :mod:`demo.retrieval_tab`,
:mod:`demo.repair_tab`), :mod:`demo.examples` (example images) and :mod:`demo.ui`
(layout and launch). Gradio is imported only by the UI parts.
"""
