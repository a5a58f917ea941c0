"""Self-contained HTML pages (the dataset and training reports): inline CSS, charts as inline
PNG, media as data: URIs, no script and nothing fetched, so a page opens offline and can be
mailed or attached to a ticket as one file."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#5b6673}.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
nav a{margin-right:12px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}
td,th{border:1px solid #d8dde3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts img{background:#fff;border:1px solid #d8dde3}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.sample{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:8px;font-size:12px;overflow-wrap:anywhere}
.sample img{image-rendering:auto;margin-right:6px;vertical-align:top}
.sample audio{width:100%;height:32px;margin:4px 0}
.pieces span{display:inline-block;background:#eef1f4;border-radius:3px;margin:1px;padding:0 3px;font-family:monospace}
.thumbs img{margin:2px;border:1px solid #d8dde3}
pre{background:#fff;border:1px solid #d8dde3;padding:8px;overflow:auto;max-height:360px;font-size:12px}
code{font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def page(title: str, subtitle: str, sections: Iterable[tuple[str, str, str]]) -> str:
    """A whole page: sections are (anchor, heading, body HTML), listed in a top navigation."""
    sections = list(sections)
    nav = " ".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in sections)
    body = "\n".join(f'<section id="{a}"><h2>{esc(h)}</h2>\n{b}\n</section>' for a, h, b in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head>\n<body><main>\n<h1>{esc(title)}</h1><p class=\"sub\">{subtitle}</p>\n"
        f"<nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            raw = isinstance(v, Raw)
            text = v.html if raw else esc(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Raw:
    """HTML that a table cell takes as is (already escaped)."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def cards(items: Iterable[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{esc(f"{v:,}" if isinstance(v, int) else v)}</b>{esc(k)}</div>' for k, v in items
    ) + "</div>"


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(mime: str, data: bytes, alt: str, width: int | None = None, height: int | None = None) -> str:
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    return f'<img src="{data_uri(mime, data)}" alt="{esc(alt)}"{size}>'


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(fig, alt: str) -> str:
    return img("image/png", figure_png(fig), alt)


def bars(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, xlabel: str = "") -> str:
    """Horizontal bars, one group per label, one bar per series (e.g. per split)."""
    import numpy as np

    plt = pyplot()
    labels = list(labels)
    height = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(6.4, max(1.6, 0.22 * len(labels) * max(1, len(series)) + 0.9)))
    y = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.barh(y + i * height, values, height=height, label=name)
    ax.set_yticks(y + height * (len(series) - 1) / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=xlabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return chart(fig, title)


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 40, mark: float | None = None,
              mark_label: str = "") -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    if len(values):
        ax.hist(values, bins=bins, color="#4c78a8")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    if mark is not None:
        ax.axvline(mark, color="#b3261e", linestyle="--", label=mark_label)
        ax.legend(fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    return chart(fig, title)
