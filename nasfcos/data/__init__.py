"""Datasets (VOC, COCO, synthetic shapes), joint image/box transforms and batching.

May import torch, torchvision, numpy, PIL and ``nasfcos.errors``; nothing else of nasfcos
(the model, engine and search read data, never the other way round)."""

from nasfcos.data.coco import COCODetection
from nasfcos.data.common import DataError, DetectionDataset, ImageRecord, read_image
from nasfcos.data.synthetic import SHAPES, make_synthetic
from nasfcos.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    build_transforms,
    collate,
    resized_hw,
)
from nasfcos.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "COCODetection",
    "Compose",
    "DataError",
    "DetectionDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageRecord",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "SHAPES",
    "VOCDetection",
    "VOC_CLASSES",
    "build_transforms",
    "collate",
    "make_synthetic",
    "read_image",
    "resized_hw",
]
