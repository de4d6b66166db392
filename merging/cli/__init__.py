"""The command line, ``python -m merging merge|run``."""
