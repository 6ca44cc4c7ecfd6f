"""Figures without a backend.

Every plot in the library is a :class:`matplotlib.figure.Figure` built without pyplot: no global
figure state, and no backend is chosen (``matplotlib.use`` is never called), so a notebook shows
the figures inline with whatever backend it runs, and a caller that writes files saves them with
:func:`save_figure`. Nothing here is imported at module import but matplotlib's figure module,
and only when a function is called.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eocausal import atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> "Figure":
    """A figure of ``figsize`` inches, not registered with pyplot (close it by dropping it)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, **kwargs)


def save_figure(fig: "Figure", path: Path | str, dpi: float = 90, **kwargs: Any) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically: readers never see half a file); returns the path."""
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **kwargs)
    return Path(path)


def png_bytes(fig: "Figure", dpi: float = 90, **kwargs: Any) -> bytes:
    """``fig`` as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png", **kwargs)
    return buffer.getvalue()
