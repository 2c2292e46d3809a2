"""Prefect orchestration of the DVC stages, and the ``tlp`` command line."""
