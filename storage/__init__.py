"""Durable artifacts of a nasfcos run: the run directory and its lock, the feature store,
the results table, rung states, node-local staging. May import ``atomicio`` (every file
is written through it), numpy, zarr, pyarrow and pandas; never ``nasfcos`` or ``flows``
(the rows it stores arrive as data, decoded by their writer)."""
