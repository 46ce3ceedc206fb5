"""The ``nasfcos`` command line: make the synthetic dataset, train, evaluate, predict.

Errors in user input (files, fields, options) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from nasfcos.arch import PRESETS
from nasfcos.data import COCODetection, VOCDetection, make_synthetic
from nasfcos.data.transforms import build_transforms
from nasfcos.errors import one_line
from nasfcos.evaluation.drawing import DRAW_THRESH
from nasfcos.model.backbones import BACKBONE_NAMES as BACKBONES
from nasfcos.model.fcos import VARIANTS


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (COCO json or VOC tree; exactly one)")
    g.add_argument("--coco-json", type=Path, help="COCO-format annotation json (any dataset in that format)")
    g.add_argument("--image-root", type=Path, help="directory that the json's file_name entries are relative to")
    g.add_argument("--voc-root", type=Path, help="VOC year directory, e.g. VOCdevkit/VOC2012 (JPEGImages, Annotations, ImageSets/Main)")
    g.add_argument("--split", default="train", help="VOC split name in ImageSets/Main (default: %(default)s)")
    g.add_argument("--split-file", type=Path, help="VOC: any file with one image name per line (overrides --split)")
    g.add_argument("--classes", help="VOC: comma-separated class names in label order (default: the 20 VOC classes)")


def _open_dataset(args: argparse.Namespace, transforms, *, remove_empty: bool = False):
    """``remove_empty`` (training only): drop COCO images without a non-crowd box, as
    flows/train_full and the reference's training filter do; evaluation keeps every image."""
    if (args.coco_json is None) == (args.voc_root is None):
        raise ValueError("give exactly one of --coco-json (with --image-root) or --voc-root")
    if args.coco_json is not None:
        if args.image_root is None:
            raise ValueError("--coco-json needs --image-root")
        return COCODetection(args.coco_json, args.image_root, transforms=transforms, remove_empty=remove_empty)
    kw = {"classes": tuple(c.strip() for c in args.classes.split(","))} if args.classes else {}
    return VOCDetection(args.voc_root, image_set=args.split, split_file=args.split_file, transforms=transforms, **kw)


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_synthetic(args: argparse.Namespace) -> int:
    paths = make_synthetic(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nasfcos.engine.distributed import rank_devices, run_rank, train_on_devices, under_torchrun
    from nasfcos.engine.train import SCHEDULES, TrainConfig
    from nasfcos.model.detector import DetectorSpec

    base = SCHEDULES[args.schedule]
    overrides = {
        k: v
        for k, v in {
            "iterations": args.iters,
            "batch_size": args.batch_size,
            "base_lr": args.lr,
            "steps": tuple(args.steps) if args.steps is not None else None,
            "warmup_iters": args.warmup,
            "clip_grad_norm": args.clip_grad,
            "min_size": tuple(args.min_size) if args.min_size else None,
            "max_size": args.max_size,
            "crop": args.crop,
            "checkpoint_every": args.checkpoint_every,
            "log_every": args.log_every,
            "seed": args.seed,
            "num_workers": args.num_workers,
            "amp": False if args.no_amp else None,
        }.items()
        if v is not None
    }
    cfg = TrainConfig.from_dict({**base.__dict__, **overrides})
    devices = rank_devices(_device(args.device), args.nproc)
    if cfg.batch_size % args.nproc:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --nproc {args.nproc}")
    tf = build_transforms(train=True, min_size=cfg.min_size, max_size=cfg.max_size, crop=cfg.crop or None, flip=cfg.flip)
    dataset = _open_dataset(args, tf, remove_empty=True)
    spec = DetectorSpec(
        num_classes=len(dataset.classes),
        backbone=args.backbone,
        decoder=args.decoder,
        width=args.width,
        variant=args.loss,
        freeze_at=args.freeze_at,
    )
    meta = {
        "classes": list(dataset.classes),
        "category_ids": list(dataset.category_ids),
        "eval_min_size": max(cfg.min_size),
        "eval_max_size": cfg.max_size,
    }
    kwargs = {"backbone_weights": args.weights, "init_checkpoint": args.init, "meta": meta}
    if under_torchrun():  # torchrun ... -m nasfcos.cli train ...: this process is one rank (--device: cpu or cuda)
        if args.nproc > 1 or ":" in (args.device or ""):
            raise ValueError("under torchrun each process is one rank on cuda:<LOCAL_RANK> or the cpu: give --device cuda or cpu, no --nproc (torchrun's --nproc-per-node)")
        result = run_rank(spec, dataset, cfg, Path(args.out), device=devices[0], **kwargs)
        if int(os.environ["RANK"]) == 0:
            print(f"checkpoint: {result.checkpoint} (iteration {result.iteration}, {result.seconds:.0f} s)")
        return 0
    logging.info("training %s on %d images, %d iterations, batch %d on %s", spec, len(dataset), cfg.iterations, cfg.batch_size, devices)
    result = train_on_devices(spec, dataset, cfg, args.out, devices=devices, max_restarts=args.max_restarts, **kwargs)
    print(f"checkpoint: {result.checkpoint} (iteration {result.iteration}, {result.seconds:.0f} s)")
    return 0


def _voc_use_07(args: argparse.Namespace) -> bool | None:
    """VOC AP rule of ``nasfcos eval``: True = VOC2007 11-point, False = all-point, None = not VOC."""
    if args.voc_root is None:
        if args.voc_metric != "auto":
            raise ValueError(f"--voc-metric {args.voc_metric} needs a --voc-root dataset")
        return None
    if args.voc_metric == "auto":  # the VOC2007 test set is reported with the 11-point AP
        return Path(args.voc_root).absolute().name == "VOC2007"
    return args.voc_metric == "07"


def cmd_eval(args: argparse.Namespace) -> int:
    from nasfcos.engine.checkpoint import detector_from_checkpoint
    from nasfcos.evaluation.coco import coco_evaluate, predict_dataset, save_results
    from nasfcos.evaluation.voc import voc_evaluate

    use_07 = _voc_use_07(args)
    device = _device(args.device)
    model, ckpt = detector_from_checkpoint(args.checkpoint)
    meta = ckpt.get("meta", {})
    min_size = args.min_size or meta.get("eval_min_size", 800)
    max_size = args.max_size or meta.get("eval_max_size", 1333)
    dataset = _open_dataset(args, build_transforms(train=False, min_size=min_size, max_size=max_size))
    if "classes" in meta and list(meta["classes"]) != list(dataset.classes):
        raise ValueError(f"{args.checkpoint}: trained for classes {meta['classes']}, dataset has {list(dataset.classes)}")
    model.to(device)
    results = predict_dataset(
        model, dataset, category_ids=list(dataset.category_ids), device=device,
        batch_size=args.batch_size, num_workers=args.num_workers,
    )  # fmt: skip
    out = Path(args.results) if args.results else Path(args.checkpoint).parent / "detections.json"
    save_results(results, out)
    gt = dataset.coco_gt()
    summary = {"detections": str(out), "num_images": len(dataset), "num_detections": len(results)}
    if gt.get("annotations"):
        metrics = coco_evaluate(gt, results)
        summary["metrics"] = metrics
        print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if use_07 is not None:  # VOC: COCOeval forgives detections inside difficult boxes; the devkit rules do not
            voc = voc_evaluate(gt, results, use_07_metric=use_07)
            metrics["VOC_mAP50"] = voc["VOC_mAP50"]
            summary["voc_metric"] = "07" if use_07 else "10"
            summary["VOC_AP50_per_class"] = voc["VOC_AP50_per_class"]
            rule = "VOC2007 11-point" if use_07 else "VOC2010+ all-point"
            print(f"VOC mAP50 {voc['VOC_mAP50']:.3f} ({rule})")
            print("  ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in voc["VOC_AP50_per_class"].items()))
    else:  # e.g. COCO test-dev: no annotations, the json is the submission
        print("no annotations in the dataset: wrote detections only")
    metrics_path = out.with_name(out.stem + "_metrics.json")
    metrics_path.write_text(json.dumps(summary, indent=2))
    print(f"detections: {out}\nmetrics: {metrics_path}")
    return 0


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _image_list(specs: list[str], image_root: Path | None) -> tuple[list[tuple[int, Path]], bool]:
    """(image id, path) of every image ``--images`` names (files, folders, globs, or one COCO
    json whose images, relative to ``--image-root`` (default: :func:`_json_image_root`), keep
    their ids); whether they came from a json."""
    import glob

    if len(specs) == 1 and specs[0].endswith(".json"):
        path = Path(specs[0])
        try:
            images = [(int(im["id"]), str(im["file_name"])) for im in json.loads(path.read_text())["images"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a COCO json with an 'images' list of id and file_name ({one_line(e, with_type=False)})") from None
        root = image_root or (_json_image_root(path, [name for _, name in images[:PROBED]]) if images else path.parent)
        return [(image_id, root / name) for image_id, name in images], True
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in spec for c in "*?["):
            paths += sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    return list(enumerate(paths)), False


PROBED = 10  # images of a json looked for when guessing its image folder


def _json_image_root(path: Path, names: list[str]) -> Path:
    """Where a COCO json's images are when ``--image-root`` is not given: the first of its own
    folder, COCO's layout (``annotations/instances_val2017.json`` -> ``val2017/``, or
    ``images/``) and a VOC tree beside it (``VOCdevkit/VOC*/JPEGImages``, as the pipeline's
    ``runs/<id>/data``) that holds one of its first images (``names``)."""
    top = path.parent.parent if path.parent.name == "annotations" else path.parent
    split = path.stem.split("_", 1)[-1]
    candidates = [path.parent, top / split, top / "images", *sorted(top.glob("VOCdevkit/VOC*/JPEGImages"))]
    for root in candidates:
        if any((root / name).is_file() for name in names):
            return root
    raise ValueError(f"{path}: none of its first images ({names[0]}, ...) is in {', '.join(str(c) for c in candidates)}; give --image-root")


def cmd_predict(args: argparse.Namespace) -> int:
    """Detections of a trained arch on your images: a COCO results json (the checkpoint's own
    category ids), and with ``--draw`` the images with their boxes drawn."""
    from torchvision.io import write_png

    from nasfcos.data import read_image
    from nasfcos.evaluation.coco import save_results, to_coco_results
    from nasfcos.evaluation.drawing import draw_detections
    from nasfcos.predictor import load
    from nasfcos.progress import Progress

    detect = load(args.checkpoint, device=_device(args.device), batch_size=args.batch_size, runtime=args.runtime)
    meta_ids = detect.category_ids
    todo, from_json = _image_list(args.images, args.image_root)
    if not todo:
        raise ValueError(f"--images {' '.join(args.images)}: no image files there ({', '.join(IMAGE_SUFFIXES)})")
    if args.draw:
        args.draw.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    read = 0
    with Progress(len(todo), "predict", unit="img") as bar:
        for i in range(0, len(todo), args.batch_size):
            chunk = []
            for image_id, path in todo[i : i + args.batch_size]:
                try:
                    chunk.append((image_id, path, read_image(path)))
                except ValueError as e:  # a bad image: named, skipped; the others go on
                    print(f"nasfcos predict: skipped {one_line(e, with_type=False)}", file=sys.stderr)
            for (image_id, path, image), det in zip(chunk, detect([im for _, _, im in chunk]) if chunk else [], strict=True):
                keep = det["scores"] >= args.score_thresh
                boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
                rows = to_coco_results(image_id, boxes, scores, labels, meta_ids)
                results += rows if from_json else [r | {"file_name": str(path)} for r in rows]
                if args.draw:  # the confident ones: at 0.05 a detector draws a hundred boxes an image
                    shown = scores >= args.draw_thresh
                    names = [detect.classes[int(k)] for k in labels[shown]]
                    write_png(draw_detections(image, boxes[shown], names, scores[shown].tolist()), str(args.draw / f"{path.stem}.png"))
            read += len(chunk)
            bar.update(len(todo[i : i + args.batch_size]))
    if read == 0:
        raise ValueError(f"none of the {len(todo)} images could be read")
    save_results(results, args.out)
    print(f"{len(results)} detections on {read} images: {args.out}" + (f"; drawn into {args.draw}" if args.draw else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nasfcos.export import export

    out = export(args.checkpoint, args.out, onnx=args.onnx)
    files = "model.safetensors, config.json, MODEL.md" + (", model.onnx" if args.onnx else "")
    print(f"exported {args.checkpoint} to {out} ({files}): nasfcos.load('{out}') or nasfcos predict --model {out}")
    return 0


def cmd_complexity(args: argparse.Namespace) -> int:
    from nasfcos.model.complexity import complexity

    c = complexity(
        args.arch,
        backbone=args.backbone,
        width=args.width,
        head_width=args.head_width,
        num_classes=args.num_classes,
        input_size=tuple(args.size),
        device=args.device,
    )
    h, w = args.size
    widths = f"@{args.width}" + (f"-{args.head_width}" if args.head_width else "")
    print(f"{args.arch} / {args.backbone} {widths}, {args.num_classes} classes, input {w}x{h} (WxH)")
    params, trainable = c["params"] / 1e6, c["trainable_params"] / 1e6
    print(f"detector: {params:.2f} M params ({trainable:.2f} M trainable), {c['macs'] / 1e9:.2f} GMACs")
    print(f"decoder:  {c['decoder_params'] / 1e6:.2f} M params, {c['decoder_macs'] / 1e9:.2f} GMACs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nasfcos.predictor import DEFAULT_BATCH, RUNTIMES

    parser = argparse.ArgumentParser(
        prog="nasfcos",
        description="NAS-FCOS (Wang et al., CVPR 2020) detectors: synthetic data, training, COCO evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="write the built-in synthetic detection dataset (VOC tree + COCO json)")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--num-train", type=int, default=300, help="training images (default: %(default)s)")
    p.add_argument("--num-val", type=int, default=60, help="validation images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same files (default: %(default)s)")
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser(
        "train",
        help="train a detector (backbone + decoder) with SGD",
        description="Train backbone + decoder with SGD, warm-up and step decay. Defaults come from --schedule "
        "(coco-1x: the paper's COCO schedule; voc-finetune: its VOC backbone finetuning); every option "
        "below overrides one field. Re-running with the same --out resumes from out/checkpoint.pt.",
    )
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (checkpoint.pt; resumed if present)")
    p.add_argument("--schedule", choices=("coco-1x", "voc-finetune"), default="coco-1x", help="default schedule (default: %(default)s)")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet50", help="backbone (default: %(default)s)")
    p.add_argument(
        "--weights",
        help="backbone weights: a local file (torchvision state dict or nasfcos checkpoint) or a torchvision weight name, "
        "e.g. ResNet50_Weights.IMAGENET1K_V1 or FCOS_ResNet50_FPN_Weights.COCO_V1 (read from the torch cache, TORCH_HOME; "
        "downloaded there if absent); none = random init",
    )
    p.add_argument("--init", type=Path, help="initialise from a nasfcos checkpoint (e.g. the VOC-finetuned model); mismatched heads are skipped")
    p.add_argument("--freeze-at", type=int, default=2, help="freeze stem (1) or stem+stage1 (2, FCOS) of the backbone; 0 = none (default: %(default)s)")
    p.add_argument("--decoder", default="fpn-fcos", help="decoder name (default: %(default)s)")
    p.add_argument("--width", type=int, default=256, help="decoder channel width (default: %(default)s)")
    p.add_argument("--loss", choices=VARIANTS, default="paper", help="FCOS loss variant (default: %(default)s)")
    p.add_argument("--iters", type=int, help="total iterations")
    p.add_argument("--batch-size", type=int, help="images per iteration")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--steps", type=int, nargs="*", help="iterations where lr is divided by 10")
    p.add_argument("--warmup", type=int, help="linear warm-up iterations (from lr/3)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (0 = off)")
    p.add_argument("--min-size", type=int, nargs="+", help="short side(s) of the resized input (several = multi-scale)")
    p.add_argument("--max-size", type=int, help="maximum long side of the resized input")
    p.add_argument("--crop", type=int, help="square random crop after resizing (0 = none)")
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    p.add_argument("--log-every", type=int, help="iterations between log lines")
    p.add_argument("--seed", type=int, help="seed of init, data order and augmentation")
    p.add_argument("--num-workers", type=int, help="data loader processes")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu); with --nproc N, cuda:K means cuda:K..K+N-1")
    p.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes, one per device (NCCL on cuda, gloo on cpu); the batch size stays the global "
        "one and must divide by N; a run resumes on any N that divides it (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on GPU (AMP is on by default on CUDA)")
    p.add_argument("--max-restarts", type=int, default=0, help="with --nproc N > 1: restarts of a group that lost a rank (it resumes from the last checkpoint)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="COCO AP of a checkpoint on a dataset; writes detections in the COCO results format",
        description="Predict on every image, write the detections as a COCO results json (original image "
        "coordinates and category ids: the test-dev submission format) and, when the dataset has "
        "annotations, print AP/AP50/AP75/APs/APm/APl from pycocotools; on a VOC tree also the VOC mAP50.",
    )
    _add_data_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="nasfcos checkpoint.pt")
    p.add_argument("--results", type=Path, help="detections json path (default: next to the checkpoint)")
    p.add_argument(
        "--voc-metric", choices=("auto", "07", "10"), default="auto",
        help="with --voc-root, also print VOC mAP50 (devkit rules for difficult boxes): 07 = VOC2007 11-point, "
        "10 = VOC2010+ all-point area; auto = 07 when the year directory is VOC2007 (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--min-size", type=int, help="short side at test time (default: from the checkpoint)")
    p.add_argument("--max-size", type=int, help="max long side at test time (default: from the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="detections of a trained arch on your images (COCO results json; --draw: the images with boxes)",
        description="Run a trained checkpoint on image files, folders, globs or a COCO json's images; write the "
        "detections as a COCO results json (the dataset's own category ids; a json's image ids) and, with "
        "--draw, each image with its boxes, class names and scores. A bad image is one line naming it and "
        "is skipped; exit 2 when none could be read.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="nasfcos checkpoint.pt, or the folder holding it (runs/<id>/full/<arch_id>)")
    which.add_argument("--model", type=Path, dest="checkpoint", help="a folder `nasfcos export` wrote")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, globs ('photos/*.jpg'), or one COCO json")
    p.add_argument(
        "--image-root",
        type=Path,
        help="with a COCO json: the folder its file_name entries are relative to (default: the json's folder, "
        "COCO's <split>/ or images/ beside annotations/, or a VOCdevkit/VOC*/JPEGImages there: the first that holds its first image)",
    )
    p.add_argument("--out", type=Path, default=Path("predictions.json"), help="results json (default: %(default)s)")
    p.add_argument("--draw", type=Path, help="folder for the images with their detections drawn (PNG)")
    p.add_argument("--score-thresh", type=float, default=0.05, help="keep detections scoring at least this (default: %(default)s, as evaluation)")
    p.add_argument("--draw-thresh", type=float, default=DRAW_THRESH, help="with --draw, draw the detections scoring at least this (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per forward pass (default: %(default)s, as the evaluate stage: GroupNorm sees the padding)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch", help="with --model: run its model.onnx in onnxruntime (default: %(default)s)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="a trained detector as a self-contained folder (model.safetensors + config.json + MODEL.md [+ model.onnx])",
        description="Write the weights (safetensors, no pickle), config.json (format_version, spec with the "
        "decoder's arch string, classes and their dataset ids, input size, post-processing) and MODEL.md of a checkpoint "
        "into a folder that nasfcos.load and `nasfcos predict --model FOLDER` read without the run directory.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="nasfcos checkpoint.pt, or the folder holding it")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument(
        "--onnx", action="store_true",
        help="also model.onnx: the network (dynamic batch and size, opset 21, NMS not in the graph), checked in onnxruntime; needs the export extra",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "complexity",
        help="parameters and multiply-accumulates of a detector (paper Table 2)",
        description="Count the parameters and the multiply-accumulates (the paper's 'FLOPs') of one forward "
        "pass on a single image, for the whole detector and for the decoder alone. Convolutions, linear "
        "layers and deformable convolutions are counted; norms, activations, interpolation and additions "
        "are not (see nasfcos/model/complexity.py).",
    )
    p.add_argument("arch", help=f"decoder: preset name ({', '.join(PRESETS)}) or canonical arch string")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet50", help="backbone (default: %(default)s)")
    p.add_argument("--width", type=int, default=256, help="FPN channel width (default: %(default)s)")
    p.add_argument("--head-width", type=int, help="head channel width (default: same as --width; 256 with --width 128 is @128-256)")
    p.add_argument("--num-classes", type=int, default=80, help="object classes (default: %(default)s, COCO)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1088], metavar=("H", "W"), help="input height and width (default: 800 1088, the paper's 1088x800)")
    p.add_argument("--device", default="meta", help="meta (shape-only, fast, same counts) or cpu/cuda to run the real forward pass (default: %(default)s)")
    p.set_defaults(func=cmd_complexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"nasfcos {args.command}: error: {one_line(e, with_type=False)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from nasfcos.onnx_export import OnnxExportError

        # no ONNX for this arch (the folder's safetensors still works), or a data loader worker's error
        if isinstance(e, OnnxExportError) or "Original Traceback" in str(e) or "DataLoader worker" in str(e):
            print(f"nasfcos {args.command}: error: {one_line(e, with_type=False)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
