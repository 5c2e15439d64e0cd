#!/usr/bin/env python3
"""Predicted data-parallel speed-up of resnet-cifar on N machines (no dependencies).

Model of one step on N machines, each as fast as the one measured:
    compute   = (global batch / N) / (that machine's training img/s at its share of the batch)
    all-reduce = 2 (N - 1) / N * gradient bytes / link bandwidth      (ring all-reduce)
    step      = compute + all-reduce                                  (no overlap)
Speed-up = step on 1 machine / step on N. Per-image speed at small per-rank batches is taken
as constant (optimistic: small batches use cores less well), and latency is ignored
(about 2 (N - 1) messages of microseconds each). Adding machines stops paying once the
all-reduce takes as long as the compute (half of each step is waiting for the link): at a
per-rank batch of img/s x 2 x gradient bytes / bandwidth.

    python3 scripts/scaling_model.py                    # the table
    python3 scripts/scaling_model.py --svg docs/scaling.svg
"""
import argparse

GRADIENT_BYTES = 11_173_962 * 4  # ResNet-18, 10 classes: 11.2 M parameters in f32 (44.7 MB)

# Training img/s of one 2-core machine (README, Speed: resnet-cifar, batch 64, 2 threads), and
# the batch of the recipe that uses that stem.
STEMS = {
    "seed stem (batch 64)": (1806.0, 64),
    "cifar stem (batch 128)": (168.5, 128),
}
LINKS_GBIT = [10, 25, 100]


def step_seconds(n, img_per_s, batch, gbit):
    compute = batch / n / img_per_s
    reduce = 0.0 if n == 1 else 2 * (n - 1) / n * GRADIENT_BYTES / (gbit * 1e9 / 8)
    return compute + reduce


def speedup(n, img_per_s, batch, gbit):
    return step_seconds(1, img_per_s, batch, gbit) / step_seconds(n, img_per_s, batch, gbit)


def break_even_batch(img_per_s, gbit):
    """Per-rank batch whose compute takes as long as the (large-N) ring all-reduce."""
    return img_per_s * 2 * GRADIENT_BYTES / (gbit * 1e9 / 8)


def svg(path, ns):
    w, h, left, bottom, top, right = 640, 400, 60, 50, 20, 200
    xmax, ymax = max(ns), 0.0
    series = []
    colours = {10: "#d62728", 25: "#ff7f0e", 100: "#2ca02c"}
    for name, (ips, batch) in STEMS.items():
        for gbit in LINKS_GBIT:
            pts = [(n, speedup(n, ips, batch, gbit)) for n in ns if n <= batch]
            ymax = max(ymax, max(p[1] for p in pts))
            series.append((f"{name.split(' (')[0]}, {gbit} Gb/s", pts, colours[gbit], "seed" in name))
    ymax = max(2.0, ymax * 1.1)
    X = lambda n: left + (n - 1) / (xmax - 1) * (w - left - right)
    Y = lambda s: h - bottom - s / ymax * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
           f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">machines (2 cores each)</text>',
           f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" '
           f'text-anchor="middle">predicted speed-up</text>']
    for n in [1] + [n for n in ns if n % 8 == 0]:
        out.append(f'<text x="{X(n):.1f}" y="{h - bottom + 16}" text-anchor="middle">{n}</text>')
    step = 1 if ymax <= 8 else 2 if ymax <= 16 else 5
    for s in range(0, int(ymax) + 1, step):
        out.append(f'<text x="{left - 6}" y="{Y(s) + 4:.1f}" text-anchor="end">{s}</text>')
        out.append(f'<line x1="{left}" y1="{Y(s):.1f}" x2="{w - right}" y2="{Y(s):.1f}" stroke="#ddd"/>')
    for i, (label, pts, colour, dashed) in enumerate(series):
        d = " ".join(f"{X(n):.1f},{Y(s):.1f}" for n, s in pts)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        ly = top + 16 * i + 10
        out.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 34}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{w - right + 40}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--svg", help="also draw the speed-up curves into this SVG file")
    ap.add_argument("--max-machines", type=int, default=64)
    a = ap.parse_args()
    ns = list(range(1, a.max_machines + 1))
    shown = [n for n in [2, 4, 8, 16, 32, 64] if n <= a.max_machines]
    print("| stem, global batch | link | " + " | ".join(f"N={n}" for n in shown)
          + " | half of each step waits for the link below (images per rank) |")
    print("|---|---|" + "---|" * len(shown) + "---|")
    for name, (ips, batch) in STEMS.items():
        for gbit in LINKS_GBIT:
            cells = " | ".join(f"{speedup(n, ips, batch, gbit):.2f}x" if n <= batch else "" for n in shown)
            print(f"| {name} | {gbit} Gb/s | {cells} | {break_even_batch(ips, gbit):.0f} |")
    if a.svg:
        svg(a.svg, ns)


if __name__ == "__main__":
    main()
