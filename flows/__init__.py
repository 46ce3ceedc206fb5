"""Prefect flows: thin orchestration over ``nasfcos`` and ``storage``."""
