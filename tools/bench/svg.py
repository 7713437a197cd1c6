"""`--chart FILE.svg`: a hand-written SVG of the report, grouped bars per workload."""

from __future__ import annotations

import math
from typing import Any

from .caches import CACHING
from .common import PHASES, TARGETS, WORKLOADS
from .report import _fmt

COLORS = {"raw": "#9e9e9e", "qsd_raw": "#e07b39", "qsd_qcow2": "#c44e52", "spx": "#2b6cb0",
          "spx_1snap": "#4c9be8", "spx_8snap": "#7fb8f0", "spx_plex": "#2f9e74",
          "reflink": "#8e6bbf"}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_svg(report: dict[str, Any]) -> str:
    """Four panels (one per workload), one bar per target, phase and caching (the main
    pool's rows; the pool-file-system rows are in the table only), each panel on its own
    scale; hatched bars are re-writes, pale ones buffered and warm."""
    panel_w, panel_h, top, left = 560, 300, 70, 60
    width, height = 2 * panel_w + 40, 2 * panel_h + top + 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="white" '
           'fill-opacity="0.0"/><line x1="0" y1="0" x2="0" y2="6" stroke="white" '
           'stroke-width="2"/></pattern></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" '
           f'font-weight="bold">shadowplex bench ({_esc(report["profile"])}, medians of '
           f'{report["runs"]} runs, {_esc(report["generator"])}, psync QD1)</text>',
           f'<text x="{width / 2}" y="42" text-anchor="middle" fill="#555">'
           f'{_esc(report["date"])} - {_esc(str(report["machine"].get("nproc")))} CPUs, '
           f'kernel {_esc(str(report["machine"].get("kernel")))}; higher is better; solid = '
           f'O_DIRECT, cold; pale = buffered, warm; hatched = re-writes</text>']
    for i, w in enumerate(WORKLOADS):
        px = 20 + (i % 2) * (panel_w + 20)
        py = top + (i // 2) * (panel_h + 30)
        rows = [r for r in report["results"] if r["workload"] == w and not r["pool_fs"]]
        label, unit = WORKLOADS[w][0], WORKLOADS[w][1]
        out.append(f'<text x="{px + panel_w / 2}" y="{py}" text-anchor="middle" '
                   f'font-size="13" font-weight="bold">{_esc(label)} ({unit})</text>')
        if not rows:
            continue
        vmax = max(r["median"] for r in rows) * 1.15
        ax_x, ax_y, ax_h = px + left, py + 20, panel_h - 90
        ax_w = panel_w - left - 10
        # grid and scale
        step = 10 ** math.floor(math.log10(vmax / 4)) if vmax > 0 else 1
        for mult in (1, 2, 5, 10):
            if vmax / (step * mult) <= 6:
                step *= mult
                break
        g = 0.0
        while g <= vmax:
            y = ax_y + ax_h - g / vmax * ax_h
            out.append(f'<line x1="{ax_x}" y1="{y:.1f}" x2="{ax_x + ax_w}" y2="{y:.1f}" '
                       f'stroke="#e5e5e5"/>')
            out.append(f'<text x="{ax_x - 4}" y="{y + 4:.1f}" text-anchor="end" '
                       f'fill="#555">{g:,.0f}</text>')
            g += step
        out.append(f'<line x1="{ax_x}" y1="{ax_y + ax_h}" x2="{ax_x + ax_w}" '
                   f'y2="{ax_y + ax_h}" stroke="#333"/>')
        slot = ax_w / len(rows)
        bw = slot * 0.7
        for j, r in enumerate(rows):
            h = r["median"] / vmax * ax_h
            x = ax_x + j * slot + (slot - bw) / 2
            y = ax_y + ax_h - h
            color = COLORS[r["target"]]
            name = TARGETS[r["target"]] + (f", {PHASES[r['phase']]}" if PHASES[r["phase"]]
                                           else "")
            pale = ' fill-opacity="0.45"' if r["caching"] == "cached" else ""
            name += f" ({CACHING[r['caching']]})"
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                       f'fill="{color}"{pale}><title>{_esc(name)}: {r["median"]:,.1f} {unit}'
                       f'</title></rect>')
            if r["phase"] == "rewrite":
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                           f'fill="url(#hatch)"/>')
            out.append(f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                       f'font-size="9">{_fmt(r["median"])}</text>')
            short = {"raw": "raw", "qsd_raw": "qsd raw", "qsd_qcow2": "qsd qcow2",
                     "spx": "spx", "spx_1snap": "spx 1 snap", "spx_8snap": "spx 8 snaps",
                     "spx_plex": "spx plex sync", "reflink": "reflink"}[r["target"]]
            short += {"steady": "", "first": " first", "rewrite": " rewr.",
                      "pass": " 1 pass", "before": " pass before"}[r["phase"]]
            short += " (buf.)" if r["caching"] == "cached" else ""
            tx, ty = x + bw / 2, ax_y + ax_h + 8
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="end" font-size="9" '
                       f'transform="rotate(-40 {tx:.1f} {ty:.1f})">{_esc(short)}</text>')
    ly = height - 22
    lx = 20.0
    for t, label in ((t, lb) for t, lb in TARGETS.items()
                     if any(r["target"] == t and not r["pool_fs"] for r in report["results"])):
        out.append(f'<rect x="{lx:.0f}" y="{ly - 10}" width="12" height="12" '
                   f'fill="{COLORS[t]}"/>')
        out.append(f'<text x="{lx + 16:.0f}" y="{ly}">{_esc(label)}</text>')
        lx += 34 + 6.4 * len(label)
    out.append("</svg>")
    return "\n".join(out) + "\n"
