"""``python -m flows.report RUN_DIR``: (re)write a run's report."""

from flows.report.page import main

if __name__ == "__main__":
    main()
