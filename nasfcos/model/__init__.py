"""The detector: what a checkpoint holds (NAS-FCOS §3.1, §3.2).

Owns the backbones and their weights, the op table (Table 1), the searched and the
hand-designed decoders, FCOS targets/losses/post-processing, the detector that joins
them, and params/MACs counting (Table 2). Builds modules from a ``nasfcos.arch.Arch``;
may import ``nasfcos.arch``, ``nasfcos.errors`` and torch/torchvision only.
"""
