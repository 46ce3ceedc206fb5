"""The report of a run and its plots: a view of a run directory, free of Prefect.

Owns ``runs/<id>/report/`` (``page``: report.html/report.md and the stage summaries the
flows publish; ``plots``: the PNGs). May import ``storage``, ``nasfcos.arch`` (to draw
archs) and ``atomicio``; never ``prefect`` or the rest of ``flows``, so a report can be
drawn on any machine that can read the run directory (``python -m flows.report``).
"""
