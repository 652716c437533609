"""Small hand-written SVG plots for the run report (no matplotlib).

Two plots:

* :func:`line_plot`: lines over a shared x axis, with round-number ticks, a legend, optional
  moving-average smoothing drawn over the faint raw data, gaps where a value is missing (``None``,
  NaN, infinite), and a single point or a constant series drawn sensibly;
* :func:`per_timestep_plot`: one line per selected round over the diffusion timestep, coloured
  from early (purple) to late (yellow) rounds.

The SVG is meant to be inlined in an HTML page: no ``xmlns`` (HTML parsers put ``<svg>`` in the
SVG namespace), no script, every piece of text XML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Number = float | int | None
Series = Mapping[str, tuple[Sequence[Number], Sequence[Number]]]

#: categorical colours (Tableau 10)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: a few stops of viridis, early -> late
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
#: estimated width of one character of the 11 px sans-serif labels, in px
_CHAR = 6.2
#: at most this many points of one series go into the SVG (min/max per bucket beyond)
MAX_POINTS = 1200


def escape(text: object) -> str:
    """``text`` as XML/HTML text or attribute value (``& < > " '`` escaped)."""
    return html.escape(str(text), quote=True)


def finite(value: object) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------- ticks
def _steps_near(lo: float, hi: float, target: int) -> list[float]:
    """Round steps (1, 2, 2.5 or 5 times a power of ten) around (hi - lo) / target."""
    raw = (hi - lo) / max(1, target)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return [m * magnitude * scale for scale in (0.1, 1.0, 10.0) for m in (1.0, 2.0, 2.5, 5.0)]


def _ticks_for(lo: float, hi: float, step: float) -> list[float]:
    digits = max(0, -math.floor(math.log10(step)) + 3)
    ticks = []
    k = math.ceil(lo / step - 1e-9)
    while k * step <= hi + step * 1e-9:
        ticks.append(round(k * step, digits) + 0.0)  # + 0.0: no "-0"
        k += 1
    return ticks


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round-number ticks inside [lo, hi]: the step (1, 2, 2.5 or 5 times a power of ten) whose
    tick count is closest to ``target + 1``, ties to the ticks that cover more of the range.
    A zero-width range gets the single tick ``lo``."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo or not math.isfinite(hi - lo):
        return [lo]
    best: tuple[tuple[float, float], list[float]] | None = None
    for step in _steps_near(lo, hi, target):
        ticks = _ticks_for(lo, hi, step)
        if len(ticks) < 2 or len(ticks) > 4 * (target + 1):
            continue
        score = (abs(len(ticks) - (target + 1)), -(ticks[-1] - ticks[0]) / (hi - lo))
        if best is None or score < best[0]:
            best = (score, ticks)
    return best[1] if best else [lo, hi]


def format_ticks(ticks: Sequence[float]) -> list[str]:
    """Labels for ``ticks``: fixed-point with just enough decimals, or short scientific
    notation (``3e-4``) for very small or very large magnitudes; labels stay distinct."""
    if not ticks:
        return []
    biggest = max(abs(t) for t in ticks)
    scientific = biggest >= 1e5 or 0 < biggest < 1e-3
    for decimals in range(0, 13):
        if scientific:
            labels = [_sci(t, decimals) for t in ticks]
        else:
            labels = [f"{t:.{decimals}f}" for t in ticks]
        if len(set(labels)) == len(labels) and _close(labels, ticks):
            return [_no_negative_zero(lbl) for lbl in labels]
    return [f"{t:.15g}" for t in ticks]


def _close(labels: Sequence[str], ticks: Sequence[float]) -> bool:
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:])), default=0.0) or abs(ticks[0]) or 1.0
    return all(abs(float(lbl) - t) <= step * 1e-3 for lbl, t in zip(labels, ticks))


def _sci(value: float, decimals: int) -> str:
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{decimals}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _no_negative_zero(label: str) -> str:
    return label[1:] if label.startswith("-") and float(label) == 0 else label


# ---------------------------------------------------------------------------------------- data
def moving_average(values: Sequence[Number], window: int) -> list[float | None]:
    """Centred moving average over ``window`` points, ignoring missing values in the window;
    a missing value stays missing (the line keeps its gap)."""
    clean = [finite(v) for v in values]
    if window <= 1:
        return clean
    half = window // 2
    sums, counts = [0.0], [0]  # prefix sums of the valid values and of their count
    for v in clean:
        sums.append(sums[-1] + (v or 0.0))
        counts.append(counts[-1] + (v is not None))
    out: list[float | None] = []
    for i, v in enumerate(clean):
        lo, hi = max(0, i - half), min(len(clean), i + half + 1)
        out.append(None if v is None else (sums[hi] - sums[lo]) / (counts[hi] - counts[lo]))
    return out


def segments(xs: Sequence[Number], ys: Sequence[Number]) -> list[list[tuple[float, float]]]:
    """The runs of consecutive points with finite x and y: a missing value splits the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        fx, fy = finite(x), finite(y)
        if fx is None or fy is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((fx, fy))
    return [r for r in runs if r]


def thin(points: Sequence[tuple[float, float]], max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most about ``max_points`` points: per bucket its lowest and highest point, in x order
    (keeps spikes visible, unlike taking every k-th point)."""
    if len(points) <= max_points:
        return list(points)
    size = math.ceil(len(points) / (max_points // 2))
    out: list[tuple[float, float]] = []
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out.extend(sorted({lo, hi}, key=lambda p: p[0]))
    return out


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Frame:
    """Data -> pixel mapping of a plot area."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    left: float
    top: float
    right: float
    bottom: float
    invert_x: bool = False

    def px(self, x: float) -> float:
        frac = (x - self.x_lo) / (self.x_hi - self.x_lo)
        if self.invert_x:
            frac = 1 - frac
        return self.left + frac * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.bottom - self.top)

    def points(self, pts: Sequence[tuple[float, float]]) -> str:
        return " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in pts)


def _padded(lo: float, hi: float, pad_fraction: float) -> tuple[float, float]:
    """[lo, hi] widened by ``pad_fraction`` of its span; a zero span by 10 % of |value| (or 1)."""
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * pad_fraction
    return lo - pad, hi + pad


def _legend_rows(labels: Sequence[str], width: float) -> list[list[int]]:
    """Indices of ``labels`` laid out in rows that fit ``width`` px."""
    rows: list[list[int]] = [[]]
    used = 0.0
    for i, label in enumerate(labels):
        need = 26 + _CHAR * len(label)
        if rows[-1] and used + need > width:
            rows.append([])
            used = 0.0
        rows[-1].append(i)
        used += need
    return [r for r in rows if r]


def gradient_colour(fraction: float) -> str:
    """The viridis colour at ``fraction`` in [0, 1] (early -> late)."""
    f = min(1.0, max(0.0, fraction)) * (len(_VIRIDIS) - 1)
    i = min(int(f), len(_VIRIDIS) - 2)
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    t = f - i
    return "#" + "".join(f"{round(u + (v - u) * t):02x}" for u, v in zip(a, b))


# ---------------------------------------------------------------------------------------- plots
def line_plot(
    series: Series,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    width: int = 560,
    height: int = 300,
    *,
    smooth: int = 0,
    colours: Sequence[str] | None = None,
    reference: float | None = None,
    invert_x: bool = False,
    markers: bool | None = None,
    plot_id: str | None = None,
) -> str:
    """An SVG line plot of ``series`` (``{label: (xs, ys)}``).

    Args:
        series: one line per label; points with a missing x or y (``None``, NaN, inf) leave a gap.
        title, xlabel, ylabel: text (escaped here).
        width, height: size in px (the SVG also has a ``viewBox`` so it scales).
        smooth: a moving-average window; above 1 (and with more points than the window) the raw
            data is drawn faint and the average over it.
        colours: one per series (default: :data:`PALETTE`).
        reference: a y value drawn as a dashed line when inside the range (0 for a margin, ...).
        invert_x: x grows to the left (diffusion timesteps, which sampling walks downwards).
        markers: dots on the points (default: when no series has more than 40 points).
        plot_id: a ``data-plot`` attribute naming the plot (tests and CSS find it by it).
    """
    labels = list(series)
    colours = list(colours or [PALETTE[i % len(PALETTE)] for i in range(len(labels))])
    raw = {label: segments(*series[label]) for label in labels}
    pts = [p for segs in raw.values() for seg in segs for p in seg]
    rows = _legend_rows(labels, width - 70) if labels else []
    top = 30 + 16 * len(rows)
    if not pts:
        return _empty_plot(title, width, height, plot_id, top)
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = _padded(min(p[1] for p in pts), max(p[1] for p in pts), 0.06)
    x_ticks = nice_ticks(x_lo, x_hi, max(2, (width - 100) // 90))
    y_ticks = nice_ticks(y_lo, y_hi, max(2, (height - top - 45) // 45))
    y_labels, x_labels = format_ticks(y_ticks), format_ticks(x_ticks)
    left = 26 + (14 if ylabel else 0) + _CHAR * max((len(s) for s in y_labels), default=1)
    frame = _Frame(x_lo, x_hi, y_lo, y_hi, left, top, width - 14, height - (44 if xlabel else 28), invert_x)
    longest = max((len(seg) for segs in raw.values() for seg in segs), default=0)
    dots = markers if markers is not None else longest <= 40
    parts = [_open_svg(title, width, height, plot_id)]
    parts += _axes(frame, x_ticks, x_labels, y_ticks, y_labels, xlabel, ylabel, width, height)
    if reference is not None and y_lo < reference < y_hi:
        y = frame.py(reference)
        parts.append(f'<line x1="{frame.left:.1f}" y1="{y:.1f}" x2="{frame.right:.1f}" y2="{y:.1f}" '
                     'stroke="#555" stroke-width="1" stroke-dasharray="5 4"/>')
    for label, colour in zip(labels, colours):
        xs, ys = series[label]
        parts += _series(frame, xs, ys, colour, smooth, dots, label)
    parts += _legend(labels, colours, rows, width)
    parts.append("</svg>")
    return "\n".join(parts)


def _open_svg(title: str, width: int, height: int, plot_id: str | None) -> str:
    data = f' data-plot="{escape(plot_id)}"' if plot_id else ""
    return (f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(title)}"{data} font-family="sans-serif" font-size="11">\n'
            f"<title>{escape(title)}</title>\n"
            f'<rect width="{width}" height="{height}" fill="#fff"/>\n'
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>')


def _empty_plot(title: str, width: int, height: int, plot_id: str | None, top: float) -> str:
    return "\n".join([
        _open_svg(title, width, height, plot_id),
        f'<text x="{width / 2:.1f}" y="{(top + height) / 2:.1f}" text-anchor="middle" fill="#777">no data</text>',
        "</svg>",
    ])


def _axes(frame: _Frame, x_ticks: Sequence[float], x_labels: Sequence[str], y_ticks: Sequence[float],
          y_labels: Sequence[str], xlabel: str, ylabel: str, width: int, height: int) -> list[str]:
    """Grid lines, axis lines, tick labels and axis titles."""
    f = frame
    parts = []
    for t, label in zip(y_ticks, y_labels):
        y = f.py(t)
        parts.append(f'<line x1="{f.left:.1f}" y1="{y:.1f}" x2="{f.right:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        parts.append(f'<text x="{f.left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end" fill="#333">{escape(label)}</text>')
    for t, label in zip(x_ticks, x_labels):
        x = f.px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{f.top:.1f}" x2="{x:.1f}" y2="{f.bottom:.1f}" stroke="#f0f0f0"/>')
        parts.append(f'<line x1="{x:.1f}" y1="{f.bottom:.1f}" x2="{x:.1f}" y2="{f.bottom + 4:.1f}" stroke="#333"/>')
        parts.append(f'<text x="{x:.1f}" y="{f.bottom + 16:.1f}" text-anchor="middle" fill="#333">{escape(label)}</text>')
    parts.append(f'<line x1="{f.left:.1f}" y1="{f.top:.1f}" x2="{f.left:.1f}" y2="{f.bottom:.1f}" stroke="#333"/>')
    parts.append(f'<line x1="{f.left:.1f}" y1="{f.bottom:.1f}" x2="{f.right:.1f}" y2="{f.bottom:.1f}" stroke="#333"/>')
    if xlabel:
        parts.append(f'<text x="{(f.left + f.right) / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="#333">'
                     f"{escape(xlabel)}</text>")
    if ylabel:
        mid = (f.top + f.bottom) / 2
        parts.append(f'<text x="13" y="{mid:.1f}" transform="rotate(-90 13 {mid:.1f})" text-anchor="middle" '
                     f'fill="#333">{escape(ylabel)}</text>')
    return parts


def _series(frame: _Frame, xs: Sequence[Number], ys: Sequence[Number], colour: str, smooth: int, dots: bool,
            label: str) -> list[str]:
    """One series: faint raw data under its moving average, or the data as a line; lone
    points (a series of one point, or a point between two gaps) as dots."""
    parts = []
    n_valid = sum(1 for y in ys if finite(y) is not None)
    smoothed = smooth > 1 and n_valid > smooth
    name = escape(label)
    for seg in segments(xs, ys):
        if len(seg) == 1:
            x, y = seg[0]
            parts.append(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" fill="{colour}">'
                         f"<title>{name}</title></circle>")
            continue
        style = 'stroke-width="1" stroke-opacity="0.28"' if smoothed else 'stroke-width="1.8"'
        parts.append(f'<polyline class="series" data-series="{name}" points="{frame.points(thin(seg))}" fill="none" '
                     f'stroke="{colour}" {style} stroke-linejoin="round"/>')
        if dots and not smoothed:
            parts += [f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in seg]
    if smoothed:
        for seg in segments(xs, moving_average(ys, smooth)):
            if len(seg) > 1:
                parts.append(f'<polyline class="series smoothed" data-series="{name}" points="{frame.points(thin(seg))}" '
                             f'fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"/>')
    return parts


def _legend(labels: Sequence[str], colours: Sequence[str], rows: Sequence[Sequence[int]], width: int) -> list[str]:
    parts = []
    for r, row in enumerate(rows):
        y = 34 + 16 * r
        total = sum(26 + _CHAR * len(labels[i]) for i in row)
        x = max(8.0, (width - total) / 2)
        for i in row:
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x + 16:.1f}" y2="{y - 4}" stroke="{colours[i]}" '
                         'stroke-width="3"/>')
            parts.append(f'<text x="{x + 20:.1f}" y="{y}" fill="#222">{escape(labels[i])}</text>')
            x += 26 + _CHAR * len(labels[i])
    return parts


def pick_evenly(keys: Sequence[int], count: int) -> list[int]:
    """At most ``count`` of ``keys`` (sorted), evenly spaced, always the first and the last."""
    keys = sorted(keys)
    if len(keys) <= count:
        return keys
    if count <= 1:
        return keys[-1:]
    picked = [keys[round(i * (len(keys) - 1) / (count - 1))] for i in range(count)]
    return list(dict.fromkeys(picked))


def per_timestep_plot(
    rows: Mapping[int, Mapping[float, Number]],
    title: str,
    ylabel: str = "score",
    width: int = 560,
    height: int = 320,
    *,
    max_lines: int = 8,
    plot_id: str | None = None,
) -> str:
    """Values per diffusion timestep (``{round: {t: value}}``), one line per selected round
    (at most ``max_lines``, evenly spaced, first and last included), coloured early -> late; the
    x axis runs from the noisiest timestep on the left to t ~ 0 on the right, as sampling does."""
    chosen = pick_evenly(list(rows), max_lines)
    series: dict[str, tuple[list[float], list[Number]]] = {}
    for r in chosen:
        ts = sorted(rows[r], key=float, reverse=True)  # in sampling order
        series[f"round {r}"] = ([float(t) for t in ts], [rows[r][t] for t in ts])
    span = max(1, len(chosen) - 1)
    colours = [gradient_colour(i / span) for i in range(len(chosen))]
    return line_plot(series, title, "timestep t (sampling runs left to right)", ylabel, width, height,
                     colours=colours, invert_x=True, plot_id=plot_id)
