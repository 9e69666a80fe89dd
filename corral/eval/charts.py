"""Per-category bar charts as PNG bytes (matplotlib, Agg: no display, no CJK font needed since
labels are the English category names)."""

from __future__ import annotations

import base64
import io


def bar_chart(title: str, labels: list[str], series: dict[str, list[float | None]],
              ymax: float | None = None) -> bytes:
    """Grouped bars: one group per label, one bar per series (missing values are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 3.6), dpi=100)
    try:
        for k, (name, values) in enumerate(series.items()):
            xs = [i + (k - (n - 1) / 2) * width for i, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            bars = ax.bar(xs, ys, width=width, label=name)
            ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lb.replace("_", "\n") for lb in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        if ymax is not None:
            ax.set_ylim(0, ymax * 1.1)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
