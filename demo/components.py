"""Gradio glue: an image input that enforces the demo's limits, and error handling.

* :class:`BoundedImage`: ``gr.Image`` whose upload is checked by
  :func:`demo.limits.load_image` (bytes and pixels from the header, before decoding)
  and arrives in the handler as an RGB PIL image; problems become a ``gr.Error``.
* :func:`ui_handler`: wraps a handler so that :class:`clipdecomp.errors.ClipDecompError`
  (every deliberate error of the library and the demo's input checks) becomes a
  ``gr.Error`` with the same message, and anything unexpected becomes a short
  ``gr.Error`` while the traceback goes to the server log only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, Optional, TypeVar

import gradio as gr
import gradio.component_meta as _component_meta
from PIL import Image

from clipdecomp.errors import ClipDecompError

from .limits import load_image

__all__ = ["BoundedImage", "ui_handler", "warn"]

log = logging.getLogger("clipdecomp.demo")

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _no_stub_file() -> Iterator[None]:
    """Gradio writes a ``.pyi`` stub beside any module that defines a component subclass
    (for custom-component development); keep it from writing ``demo/components.pyi``."""
    original = getattr(_component_meta, "create_or_modify_pyi", None)
    if original is None:
        yield
        return
    _component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _component_meta.create_or_modify_pyi = original


with _no_stub_file():

    class BoundedImage(gr.Image):
        """``gr.Image`` that hands the handler a size-checked RGB PIL image (or ``None``)."""

        # Same front-end component as gr.Image. No __init__ of its own: Gradio builds the
        # front-end config from the signature of __init__. ``type`` and ``image_mode`` are
        # ignored: :meth:`preprocess` below replaces Gradio's decoding entirely.
        is_template = True

        def preprocess(self, payload: Any) -> Optional[Image.Image]:
            if payload is None:
                return None
            path = getattr(payload, "path", None)
            if path is None:
                raise gr.Error("The image did not arrive as a file; please upload it again.", print_exception=False)
            try:
                return load_image(path)
            except ClipDecompError as e:
                raise gr.Error(str(e), print_exception=False) from None


def ui_handler(fn: F) -> F:
    """Turn deliberate errors into ``gr.Error`` (message shown as is) and log the rest."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ClipDecompError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except MemoryError:
            log.exception("out of memory in %s", fn.__name__)
            raise gr.Error("The server ran out of memory for this request; try a smaller input.",
                           print_exception=False) from None
        except Exception as e:  # a bug: the user gets one line, the log gets the traceback
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(e).__name__}); the details are in the server log.",
                           print_exception=False) from None

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    """A non-fatal notice in the UI (``gr.Warning``); a no-op outside a request."""
    try:
        gr.Warning(message)
    except Exception:  # pragma: no cover - outside a Gradio request context
        log.warning(message)
