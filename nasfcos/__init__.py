"""nasfcos: NAS-FCOS (Wang et al., CVPR 2020) in plain PyTorch.

The model library never imports Prefect; orchestration lives in ``flows/``.
"""

__version__ = "0.1.0"
