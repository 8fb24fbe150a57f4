"""Benchmark figures with matplotlib (Agg backend, PNG).

matplotlib is imported on first use, so a benchmark run without `--plot` never needs it (it is the
`bench` extra of pyproject.toml, in requirements.lock). Every figure has a title, a subtitle naming
the hardware the numbers came from, labelled axes with units, a legend and a caption saying how the
numbers were made; `save` writes it at `DPI` without a timestamp, so a figure redrawn from the same
rows is the same file.
"""

from __future__ import annotations

import textwrap

DPI = 110
# one colour per system or method, the same in every figure
COLORS = {"ghostline": "#1f77b4", "llamacpp": "#ff7f0e", "hf": "#d62728", "greedy": "#7f7f7f",
          "superposed": "#1f77b4", "superposed_rerank": "#17becf", "nucleus": "#ff7f0e", "beam": "#9467bd",
          "full": "#d62728", "prefix": "#ff7f0e", "pie": "#1f77b4", "naive": "#7f7f7f", "halt": "#2ca02c",
          "exit": "#9467bd"}
CYCLE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")

PALETTE = 96  # colours of a saved PNG
_TITLE_IN, _SUBTITLE_IN, _CAPTION_LINE_IN = 0.38, 0.2, 0.19  # inches a line takes
_SUBTITLE_CHARS_IN, _CAPTION_CHARS_IN = 14, 17  # characters a line holds per inch of width


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "grid.linewidth": 0.6})
    return plt


def figure(ncols: int = 1, *, nrows: int = 1, width: float = 9.0, height: float = 5.0, **kw):
    """A figure of `nrows` x `ncols` panels: (fig, [axes], row by row)."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: str, *, title: str, subtitle: str = "", caption: str = "") -> None:
    """Title and subtitle above the panels, the caption below them, then the PNG at `path`."""
    plt = pyplot()
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * _CAPTION_CHARS_IN), break_on_hyphens=False) if caption else []
    sub = textwrap.wrap(subtitle, int(width * _SUBTITLE_CHARS_IN), break_on_hyphens=False) if subtitle else []
    top = _TITLE_IN + len(sub) * _SUBTITLE_IN
    bottom = len(lines) * _CAPTION_LINE_IN + (0.08 if lines else 0.0)
    fig.get_layout_engine().set(rect=(0.0, bottom / height, 1.0, 1.0 - (top + bottom) / height))
    fig.text(0.01, 1.0 - 0.08 / height, title, ha="left", va="top", fontsize=12, fontweight="bold")
    if sub:
        fig.text(0.01, 1.0 - (_TITLE_IN + 0.02) / height, "\n".join(sub), ha="left", va="top", fontsize=9,
                 color="#444444", linespacing=1.25)
    if lines:
        fig.text(0.01, 0.04 / height, "\n".join(lines), ha="left", va="bottom", fontsize=7.5, color="#444444",
                 linespacing=1.3)
    # an adaptive palette keeps a chart's PNG small (flat colours, anti-aliased text) at no visible cost
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=PALETTE, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def scatter_png(points: dict[str, tuple[float, float]], path: str, *, xlabel: str, ylabel: str, title: str = "",
                subtitle: str = "", caption: str = "", line: bool = False, legend_title: str | None = None,
                w: int = 880, h: int = 520) -> None:
    """One labelled point per name (x, y), axes from 0. Each point its own colour and legend entry;
    with `line` (a sweep of one parameter) the points are joined in the given order, in one colour."""
    fig, (ax,) = figure(width=w / DPI, height=h / DPI)
    xmax = max(x for x, _ in points.values()) * 1.15 or 1.0
    ymax = max(y for _, y in points.values()) * 1.15 or 1.0
    if line:
        xs, ys = zip(*points.values())
        ax.plot(xs, ys, color=CYCLE[0], linewidth=1.2, marker="o", markersize=6, label=legend_title or "sweep")
    placed: list[tuple[float, float]] = []
    for i, (name, (x, y)) in enumerate(points.items()):
        color = CYCLE[0] if line else COLORS.get(name, CYCLE[i % len(CYCLE)])
        if not line:
            ax.scatter([x], [y], s=46, color=color, label=name, zorder=3, edgecolors="white", linewidths=0.6)
        crowded = any(abs(x - px) < 0.12 * xmax and abs(y - py) < 0.05 * ymax for px, py in placed)
        ax.annotate(name, (x, y), xytext=(6, -12 if crowded else 4), textcoords="offset points", fontsize=8,
                    color=color)
        placed.append((x, y))
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(title=None if line else legend_title, loc="best", frameon=False)
    save(fig, path, title=title or f"{ylabel} against {xlabel}", subtitle=subtitle, caption=caption)
