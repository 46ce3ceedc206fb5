"""Parameters and FLOPs of the FCOS-family rows of NAS-FCOS Table 2, ours beside the paper's.

The paper's "FLOPs" are multiply-accumulates (MACs) of one forward pass at 1088x800
(W x H) with 80 COCO classes; its "Params" are millions of parameters. Ours come from
``nasfcos.model.complexity`` (what is and is not counted is in its docstring):

- params: every parameter of the detector (``count_params``);
- trainable: without the frozen stem and res2 (``freeze_at=2``), the paper's convention;
- GMACs: one forward pass, FlopCounterMode's FLOPs / 2, deformable convs counted as convs;
- decoder: params and GMACs of the decoder (FPN + heads) alone.

Every NAS-FCOS row is printed for both presets: ``nas-fcos-fpn`` (searched FPN + the
FCOS head, the released "R_50_NAS" model whose AP is in Table 2) and ``nas-fcos``
(searched FPN + searched head, "R_50_NAS_head"). The paper's X-101 is ResNeXt-101
32x4d by its caption, but its numbers are those of 32x8d (the official FCOS
X-101 model and the released NAS-FCOS X-101 are 32x8d), so X-101 rows are printed with
our ``resnext101_32x4d`` and ``resnext101_32x8d``.
Deformable-FPN-FCOS is the ``deformable-fpn-fcos`` preset: ``fpn-fcos`` whose three 1x1
laterals and three 3x3 output convs are DCNv2 with 2 deformable groups (the released
``R-50-Deformable_FPN-DENSEBOX``); P6/P7 and the head are plain.

By default the models are built and counted on the ``meta`` device: shapes only, the
same counts as a real forward pass (tests/test_complexity.py checks that) in seconds.

Usage:
    .venv/bin/python benchmarks/table2.py                      # every row (~30 s)
    .venv/bin/python benchmarks/table2.py --rows 'r50-*' x101-nas-256
    .venv/bin/python benchmarks/table2.py --device cpu         # real forward passes (minutes)
    .venv/bin/python benchmarks/table2.py --list
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nasfcos.model.complexity import complexity  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One row of Table 2 and how we build it."""

    id: str
    decoder: str  # Table 2's name
    backbone_label: str  # Table 2's name
    presets: tuple[str, ...]  # our decoders for it; () = no preset, skipped
    width: int
    head_width: int | None
    paper_gflops: float
    paper_params_m: float
    backbones: tuple[str, ...]  # ours; several when the paper's is ambiguous


NAS = ("nas-fcos-fpn", "nas-fcos")
X101 = ("resnext101_32x4d", "resnext101_32x8d")
ROWS: tuple[Row, ...] = (
    Row("mnv2-fpn-fcos", "FPN-FCOS @256", "MobileNetV2", ("fpn-fcos",), 256, None, 105.4, 9.8, ("mobilenet_v2",)),
    Row("mnv2-nas-128", "NAS-FCOS @128", "MobileNetV2", NAS, 128, None, 39.5, 7.7, ("mobilenet_v2",)),
    Row("mnv2-nas-128-256", "NAS-FCOS @128-256", "MobileNetV2", NAS, 128, 256, 105.6, 12.3, ("mobilenet_v2",)),
    Row("mnv2-nas-256", "NAS-FCOS @256", "MobileNetV2", NAS, 256, None, 131.8, 23.7, ("mobilenet_v2",)),
    Row("r50-fpn-fcos", "FPN-FCOS @256", "R-50", ("fpn-fcos",), 256, None, 169.9, 32.0, ("resnet50",)),
    Row("r50-deform-fpn-fcos", "Deformable-FPN-FCOS @256", "R-50", ("deformable-fpn-fcos",), 256, None, 172.2, 35.1, ("resnet50",)),
    Row("r50-nas-128", "NAS-FCOS @128", "R-50", NAS, 128, None, 104.3, 29.6, ("resnet50",)),
    Row("r50-nas-128-256", "NAS-FCOS @128-256", "R-50", NAS, 128, 256, 170.4, 34.1, ("resnet50",)),
    Row("r50-nas-256", "NAS-FCOS @256", "R-50", NAS, 256, None, 199.6, 46.0, ("resnet50",)),
    Row("r101-fpn-fcos", "FPN-FCOS @256", "R-101", ("fpn-fcos",), 256, None, 234.3, 50.9, ("resnet101",)),
    Row("r101-nas-256", "NAS-FCOS @256", "R-101", NAS, 256, None, 264.0, 64.9, ("resnet101",)),
    Row("x101-fpn-fcos", "FPN-FCOS @256", "X-101", ("fpn-fcos",), 256, None, 387.7, 94.9, X101),
    Row("x101-nas-256", "NAS-FCOS @256", "X-101", NAS, 256, None, 417.4, 108.9, X101),
)


def count(row: Row, preset: str, backbone: str, *, num_classes: int, size: tuple[int, int], device: str) -> dict:
    """nasfcos.model.complexity's counts for one (row, preset, backbone)."""
    return complexity(
        preset, backbone=backbone, width=row.width, head_width=row.head_width,
        num_classes=num_classes, input_size=size, device=device,
    )  # fmt: skip


def rel(ours: float, paper: float) -> str:
    return f"{(ours - paper) / paper:+.1%}"


def table(rows: list[Row], *, num_classes: int, size: tuple[int, int], device: str) -> str:
    """The markdown table (one line per row, preset and backbone)."""
    lines = [
        "| Table 2 row | Backbone | ours: decoder, backbone | GFLOPs paper | GMACs ours | Δ | Params paper (M) "
        "| params ours (M) | Δ | trainable ours (M) | Δ | decoder params (M) | decoder GMACs |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        head = f"| {row.decoder} | {row.backbone_label} "
        paper = (row.paper_gflops, row.paper_params_m)
        if not row.presets:
            lines.append(head + f"| no preset: skipped | {paper[0]} | – | – | {paper[1]} | – | – | – | – | – | – |")
            continue
        for preset in row.presets:
            for backbone in row.backbones:
                c = count(row, preset, backbone, num_classes=num_classes, size=size, device=device)
                macs, params, trainable = c["macs"] / 1e9, c["params"] / 1e6, c["trainable_params"] / 1e6
                lines.append(
                    head + f"| `{preset}`, {backbone} | {paper[0]} | {macs:.1f} | {rel(macs, paper[0])} "
                    f"| {paper[1]} | {params:.2f} | {rel(params, paper[1])} | {trainable:.2f} | {rel(trainable, paper[1])} "
                    f"| {c['decoder_params'] / 1e6:.2f} | {c['decoder_macs'] / 1e9:.1f} |"
                )
    return "\n".join(lines)


def select(patterns: list[str] | None) -> list[Row]:
    if not patterns:
        return list(ROWS)
    chosen = [r for r in ROWS if any(fnmatch.fnmatchcase(r.id, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(r.id, p) for r in ROWS)]
    if unmatched:
        raise SystemExit(f"--rows: {', '.join(unmatched)} match no row; rows: {', '.join(r.id for r in ROWS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", help="row ids or glob patterns (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the row ids and exit")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1088], metavar=("H", "W"), help="input size (default: 800 1088, the paper's 1088x800)")
    parser.add_argument("--num-classes", type=int, default=80, help="classes (default: %(default)s, COCO)")
    parser.add_argument("--device", default="meta", help="meta (shape-only, default) or cpu/cuda for real forward passes")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{r.id:22s} {r.decoder} / {r.backbone_label}" for r in ROWS))
        return 0
    start = time.perf_counter()
    size = (args.size[0], args.size[1])
    print(table(select(args.rows), num_classes=args.num_classes, size=size, device=args.device))
    print(f"\ninput 1x3x{size[0]}x{size[1]}, {args.num_classes} classes, device {args.device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
