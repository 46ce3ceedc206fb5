"""The search (NAS-FCOS §3.3): policies that sample ``nasfcos.arch.Arch`` values (PPO
controller, random, regularised evolution), successive halving, and the sync and async
search loops that drive them against an injected evaluator.

May import ``nasfcos.arch``, ``nasfcos.errors``, ``atomicio`` (its state file) and
torch/numpy; never ``nasfcos.model`` or ``nasfcos.engine`` (the evaluator, injected by the
flow, trains the models) nor prefect or storage (the results table is injected too).
"""
