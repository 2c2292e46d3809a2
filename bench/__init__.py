"""Benchmarks of the pipeline's speed and memory, each against a baseline in the same run.

``python -m bench`` (or ``make bench``) runs them all and writes ``bench/results.json`` and
the results table of ``bench/README.md``; ``--only NAME[,NAME]`` runs some, ``--quick`` a
smaller smoke run (written to ``bench/work/results-quick.json``, never over the recorded
figures). Benchmarks are not tests: nothing here is collected by pytest.
"""
