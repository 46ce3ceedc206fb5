"""Running models: the training loop (finetuning §4.1, full training §4.2), checkpoints,
seeded sampling, data-parallel training, the proxy trainer (§4.1) and feature
materialisation. May import ``nasfcos.model``, ``nasfcos.data``, ``nasfcos.arch`` and
the helpers at the top of ``nasfcos`` (errors, progress, fault injection), ``atomicio``
for its files; never ``nasfcos.search``, prefect or storage.
"""
