"""The demo's shared state: the loaded model, its TextSpan results and the caches.

One :class:`DemoState` serves every visitor of an app (the model is large, the work is
per request). It holds:

* the model (:func:`clipdecomp.loading.load_model`), loaded on first use; it can be
  switched at run time (:meth:`DemoState.switch_model`) unless the configuration forbids
  it (the default on a Hugging Face Space, where one visitor would switch it for all);
* the TextSpan results of that model: the precomputed file of the bundled model
  (``assets/toyclip_textspan.json``), a file given with ``--textspan``, or results
  computed in the app (:mod:`demo.roles_tab`);
* caches keyed by the model: text embeddings, the retrieval gallery's contributions
  (in memory and on disk), the toy Waterbirds folder and the repair means.

Everything model-dependent is dropped when the model is switched. Requests that are
running keep the :class:`ModelBundle` they started with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from PIL import Image

from clipdecomp.errors import InputError
from clipdecomp.loading import LoadedModel, assets_dir, load_model

__all__ = ["DemoConfig", "DemoState", "ModelBundle", "default_cache_dir", "bundled_results_path"]

CACHE_ENV = "CLIPDECOMP_DEMO_CACHE"
_TEXT_CACHE_SIZE = 2048


def default_cache_dir() -> Path:
    """``$CLIPDECOMP_DEMO_CACHE``, else ``~/.cache/clipdecomp-demo``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipdecomp-demo"


def bundled_results_path() -> Path:
    """The precomputed TextSpan results of the bundled model."""
    return assets_dir() / "toyclip_textspan.json"


@dataclass
class DemoConfig:
    """How the app runs.

    Attributes:
        model, pretrained: passed to ``load_model`` (``None``: the bundled toy model).
        textspan: TextSpan results file of that model (default for the bundled model:
            :func:`bundled_results_path`; none for other models until computed in the app).
        cache_dir: gallery contributions, toy Waterbirds images, exports.
        gallery_size, gallery_seed: the default retrieval gallery of rendered toy scenes.
        waterbirds_scale: size of the toy Waterbirds set relative to the full toy set
            (train 1200 / val 400 / test 800 images at 1.0).
        random_trials: random-heads baseline draws in the repair evaluation.
        allow_model_switch: whether visitors may load another model.
        device: torch device.
    """

    model: Optional[str] = None
    pretrained: Optional[str] = None
    textspan: Optional[Path] = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    gallery_size: int = 200
    gallery_seed: int = 0
    waterbirds_scale: float = 0.1
    random_trials: int = 3
    allow_model_switch: bool = True
    device: str = "cpu"


@dataclass
class ModelBundle:
    """A loaded model with everything computed for it."""

    lm: LoadedModel
    spec: tuple[Optional[str], Optional[str]]
    results: Any = None  # TextSpanResults or None
    results_source: str = ""
    texts: dict[str, torch.Tensor] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.RLock, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.lm.visual.transformer.resblocks)

    @property
    def n_heads(self) -> int:
        return int(self.lm.visual.transformer.resblocks[0].attn.num_heads)

    @property
    def is_bundled(self) -> bool:
        return self.spec == (None, None)

    @property
    def key(self) -> str:
        """A short stable id of the model for on-disk caches."""
        parts = [str(self.spec), self.lm.name, str(self.lm.pretrained)]
        p = Path(str(self.lm.pretrained)) if self.lm.pretrained else None
        if p is not None and p.is_file():
            st = p.stat()
            parts += [str(st.st_size), str(int(st.st_mtime))]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def describe(self) -> str:
        h, w = self.lm.image_size
        what = "the bundled toy-world model (assets/toyclip)" if self.is_bundled else (
            f"{self.spec[0]}" + (f" / {self.spec[1]}" if self.spec[1] else " (random weights)"))
        return f"{what}: {self.n_layers} layers x {self.n_heads} heads, {h}x{w} input"

    def late_layers(self) -> list[int]:
        """The layers TextSpan covered, else the last four."""
        if self.results is not None:
            return list(self.results.layers)
        return list(range(max(0, self.n_layers - 4), self.n_layers))

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings ``[T, D]`` (:func:`clipdecomp.zeroshot.text_embeddings`), cached per text."""
        from clipdecomp.zeroshot import text_embeddings

        with self.lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
            if missing:
                if len(self.texts) + len(missing) > _TEXT_CACHE_SIZE:
                    self.texts.clear()
                for t, e in zip(missing, text_embeddings(self.lm, missing)):
                    self.texts[t] = e
            return torch.stack([self.texts[t] for t in texts])

    def model_view(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """The preprocessed ``[1, 3, H, W]`` input and the RGB crop the model sees
        (the tensor with the normalisation undone), as in ``clipdecomp heatmap``."""
        x = self.lm.preprocess(image)
        cfg = getattr(self.lm.visual, "preprocess_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(3, 1, 1)
        shown = ((x.float() * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        return x[None].to(self.lm.device, self.lm.dtype), Image.fromarray(shown, "RGB")

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``memo[key]``, computed once with ``make()`` (concurrent callers wait for it)."""
        with self.lock:
            if key not in self.memo:
                self.memo[key] = make()
            return self.memo[key]


class DemoState:
    """The app's model and caches (thread-safe loading and switching)."""

    def __init__(self, config: Optional[DemoConfig] = None) -> None:
        self.config = config or DemoConfig()
        self._lock = threading.RLock()
        self.files_lock = threading.Lock()  # serialises writing shared cache files (toy data sets)
        self._bundle: Optional[ModelBundle] = None
        self._workdir: Optional[Path] = None

    # ------------------------------------------------------------------ model
    @property
    def bundle(self) -> ModelBundle:
        """The current model bundle, loading the configured model on first use."""
        with self._lock:
            if self._bundle is None:
                self._bundle = self._load(self.config.model, self.config.pretrained, self.config.textspan)
            return self._bundle

    def _load(self, name: Optional[str], pretrained: Optional[str], textspan: Optional[Path]) -> ModelBundle:
        lm = load_model(name, pretrained, device=self.config.device)
        bundle = ModelBundle(lm, (name, pretrained))
        if textspan is not None:
            self._attach_results(bundle, Path(textspan))
        else:  # the shipped results of the bundled model, else results computed in an earlier run
            path = bundled_results_path() if bundle.is_bundled else self.results_cache_path(bundle)
            if path.is_file():
                self._attach_results(bundle, path)
        return bundle

    def results_cache_path(self, bundle: ModelBundle) -> Path:
        """Where TextSpan results computed in the app are kept for this model."""
        return self.cache_dir / f"textspan-{bundle.key}.json"

    @staticmethod
    def _attach_results(bundle: ModelBundle, path: Path) -> None:
        from clipdecomp.textspan_results import TextSpanResults

        results = TextSpanResults.load(path)
        D = int(bundle.lm.visual.output_dim)
        if results.embed_dim != D or max(results.layers, default=0) >= bundle.n_layers or results.n_heads > bundle.n_heads:
            raise InputError(
                f"the TextSpan results {path} (D={results.embed_dim}, layers {results.layers}, {results.n_heads} heads) "
                f"do not fit the model ({bundle.describe()}, D={D}); they belong to another model."
            )
        bundle.results, bundle.results_source = results, str(path)

    def switch_model(self, name: Optional[str], pretrained: Optional[str]) -> ModelBundle:
        """Load another model (``name=None`` or empty: the bundled one) and make it current.

        Raises:
            InputError: switching is disabled on this deployment.
            ClipDecompError: from ``load_model`` (unknown name, not a ViT, bad weights).
        """
        name = (name or "").strip() or None
        pretrained = (pretrained or "").strip() or None
        if not self.config.allow_model_switch:
            raise InputError(
                "Loading another model is disabled on this deployment; run the app yourself with "
                "`python app.py --model NAME --pretrained TAG`."
            )
        if name is None and pretrained is not None:
            raise InputError("A pretrained tag needs a model name (e.g. ViT-B-16 with laion2b_s34b_b88k).")
        with self._lock:
            if self._bundle is not None and self._bundle.spec == (name, pretrained):
                return self._bundle
        bundle = self._load(name, pretrained, None)  # outside the lock: requests keep using the current model
        with self._lock:
            self._bundle = bundle
        return bundle

    # ------------------------------------------------------------------ files
    @property
    def cache_dir(self) -> Path:
        d = Path(self.config.cache_dir)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def new_output_dir(self, prefix: str, keep: int = 4) -> Path:
        """A fresh folder for files handed to the browser (inside the system temp folder,
        which Gradio serves); only the ``keep`` newest such folders are kept."""
        with self._lock:
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="clipdecomp-demo-"))
            old = sorted((d for d in self._workdir.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
            for d in old[: max(0, len(old) - keep + 1)]:
                shutil.rmtree(d, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self._workdir))
