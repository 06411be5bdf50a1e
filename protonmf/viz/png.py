"""Figures to PNG bytes, and PNG bytes to a data URI for self-contained HTML: written once for every figure."""

from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["LABEL_PT", "REPORT_DPI", "figure_png", "png_data_uri"]

#: The resolution of the report's figures, and the size of their smallest text: 10 pt at 90 dpi is
#: 12.5 px, legible beside the page's own text at a normal window width.
REPORT_DPI = 90
LABEL_PT = 10


def figure_png(fig: Figure, *, dpi: int = REPORT_DPI, tight: bool = False) -> bytes:
    """The figure as PNG bytes; the figure is closed (figures are made for one picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
