"""``full/<arch_id>/MODEL.md``: the card of a trained arch (issue #30, item 4), written by the
evaluate stage for every leaderboard row that trained: what it is, how it was made, how
well it does against the baseline trained with the same budget, and how to load it.
No prefect: ``python -m flows.report`` users and tests call it too."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import atomicio

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.4f}" if isinstance(v, float) else str(v))


def model_card(row: pd.Series, board: pd.DataFrame, config: dict, results: pd.DataFrame | None, *, meta: dict, iteration: int, full: dict, detections: str | None = None) -> str:
    """The card's markdown for ``row`` of the leaderboard ``board`` (``results``: the search's
    rows, for the proxy rank; ``meta``: the checkpoint's classes and input size; ``full``:
    ``nasfcos.model.complexity`` of the detector at 800x1088; ``detections``: the PNG beside
    the card with a few val images drawn)."""
    from nasfcos.arch import resolve

    t, f, d = config["train_full"], config["finetune"], config["data"]
    arch = str(resolve(row.arch))
    classes = list(meta.get("classes", []))
    if t["init_from_finetuned"]:
        weights = f"the backbone finetuned by this run (`backbone/checkpoint.pt`, from `{f['weights'] or 'random init'}`)"
    else:
        weights = f"`{t['weights']}`" if t["weights"] else "random init"
    lines = [
        f"# `{row.arch_id}` ({row.kind}): an FCOS detector with a NAS-FCOS decoder",
        "",
        f"Decoder: `{arch}`.",
        "",
        "## What it is",
        "",
        f"- Backbone `{f['backbone']}` (initial weights: {weights}); decoder width {t['width']}" + (f", head width {t['head_width']}" if t["head_width"] else ""),
        f"- Decoder at the proxy width (@{config['proxy']['width']}): {_fmt(row.params)} params, {_fmt(row.macs)} MACs",
        f"- At 800x1088 (one image): decoder {full['decoder_params'] / 1e6:.2f} M params, {full['decoder_macs'] / 1e9:.2f} GMACs; "
        f"detector {full['params'] / 1e6:.2f} M params, {full['macs'] / 1e9:.2f} GMACs",
        f"- Classes ({len(classes)}): {', '.join(classes)}; dataset `{d['kind']}`",
        "",
        "## How it was trained",
        "",
        f"- {iteration} of {t['iterations']} iterations, batch {t['batch_size']}, lr {t['lr']} (x0.1 at {list(t['steps'])}), warm-up {t['warmup']}, "
        f"short side {list(t['min_size'])}, long side <= {t['max_size']}, gradient clip {t['clip_grad'] or 'none'}",
        "- The same budget and seed as every other leaderboard row (the baselines included)",
    ]
    if results is not None and row.kind == "searched" and "reward" in results:
        ok = results[results.status == "ok"].sort_values("reward", ascending=False).reset_index(drop=True)
        rank = ok.index[ok.arch_id == row.arch_id]
        where = f", rank {int(rank[0]) + 1} of {len(ok)} archs searched" if len(rank) else ""
        lines.append(f"- Proxy reward (negative meta-val loss) {_fmt(row.proxy_reward)}{where}")
    elif row.kind == "baseline":
        lines.append(f"- A hand-designed baseline; its proxy reward, scored as the search scores an arch: {_fmt(row.proxy_reward)}")
    lines += ["", "## How well it does (COCO-style AP on the val split)", "", "| arch | kind | " + " | ".join(METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
    for r in board[(board.arch_id == row.arch_id) | (board.kind == "baseline")].itertuples():
        lines.append(f"| `{r.arch_id}` | {r.kind} | " + " | ".join(_fmt(getattr(r, m, None)) for m in METRICS) + " |")
    if detections:
        lines += ["", f"![a few val images with its confident detections, as the evaluate stage drew them]({detections})"]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "import nasfcos",
        'detect = nasfcos.load("path/to/this/folder")  # runs/<run_id>/full/<arch_id>: the card names no path, a run may move',
        "found = detect(images)  # PIL images or (3, H, W) tensors of any size",
        "```",
        "",
        f"`nasfcos predict --checkpoint <this folder> --images <files, folder or COCO json> --draw drawn/`; "
        f"`nasfcos export --checkpoint <this folder> --out <folder>` for a folder without the run (safetensors + config.json). "
        f"Input: short side {meta.get('eval_min_size', 800)}, long side <= {meta.get('eval_max_size', 1333)}, ImageNet mean/std.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: str | Path, text: str) -> Path:
    """Written only when its text changed: a rerun that adds archs leaves the others' files alone."""
    path = Path(path)
    if not (path.exists() and path.read_text() == text):
        atomicio.write_text(path, text)
    return path
