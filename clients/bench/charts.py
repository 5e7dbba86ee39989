"""PNG line charts for the benchmark reports, drawn with Pillow (already installed
with diffusers): no plotting library to install for one chart type."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT, MARGIN = 900, 560, 70


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str, x_label: str,
               y_label: str, y_range: tuple[float, float] = (0.0, 1.0), y_format: str = "{:.0%}",
               guide_y: float | None = None) -> Path:
    """One line with markers per series over a shared x axis (its distinct x values as
    evenly spaced categories, so rate scales 0.5 .. 8 read evenly)."""
    if not series or not any(series.values()):
        raise ValueError("series: nothing to plot")
    xs = sorted({x for points in series.values() for x, _ in points})
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN, MARGIN - 20, WIDTH - 200, HEIGHT - MARGIN
    y_low, y_high = y_range

    def px(x: float) -> float:
        return left + (xs.index(x) + 0.5) * (right - left) / len(xs)

    def py(y: float) -> float:
        y = min(max(y, y_low), y_high)
        return bottom - (y - y_low) / (y_high - y_low) * (bottom - top)

    draw.text((left, 10), title, fill="black", font=font)
    for i in range(6):  # horizontal grid and y labels
        y = y_low + i * (y_high - y_low) / 5
        draw.line([(left, py(y)), (right, py(y))], fill=(225, 225, 225))
        draw.text((8, py(y) - 6), y_format.format(y), fill="black", font=font)
    if guide_y is not None:
        draw.line([(left, py(guide_y)), (right, py(guide_y))], fill=(120, 120, 120), width=1)
    draw.rectangle([left, top, right, bottom], outline="black")
    for x in xs:
        draw.text((px(x) - 8, bottom + 8), f"{x:g}", fill="black", font=font)
    draw.text(((left + right) / 2 - 40, bottom + 30), x_label, fill="black", font=font)
    draw.text((8, top - 18), y_label, fill="black", font=font)
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = [(px(x), py(y)) for x, y in sorted(points)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=3)
        for cx, cy in coords:
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        legend_y = top + 10 + 20 * i
        draw.line([(right + 20, legend_y + 6), (right + 50, legend_y + 6)], fill=colour, width=3)
        draw.text((right + 58, legend_y), name, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
