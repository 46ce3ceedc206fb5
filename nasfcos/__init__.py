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
