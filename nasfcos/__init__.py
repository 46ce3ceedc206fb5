"""nasfcos: NAS-FCOS (Wang et al., CVPR 2020) in plain PyTorch.

Packages: ``arch`` (the Arch value object and token space, below everything),
``model`` (the detector), ``search`` (policies and the search loop), ``engine``
(training, checkpoints, proxy, materialise), ``evaluation`` (COCO/VOC AP), ``data``;
helpers every package may use: ``errors``, ``progress``, ``fault_injection``;
``cli`` (the ``nasfcos`` command). Never imports prefect, ``storage`` or ``flows``
(orchestration and durable run files live there); files are written through
``atomicio``. docs/architecture.md draws the import rules.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A trained detector to call on images: ``nasfcos.load("runs/<id>/full/<arch_id>")(images)``
    (``nasfcos.predictor``; imported here on first use, so ``import nasfcos`` stays light)."""
    from nasfcos.predictor import load as _load

    return _load(path, **kwargs)
