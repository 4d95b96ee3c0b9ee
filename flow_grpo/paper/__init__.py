"""Reproducing the TP-GRPO paper's evaluation (arXiv 2602.06422, Table 1).

- :mod:`.published`: the published prompt sets, pinned to a commit of the authors' repository and
  verified by git blob hash (`prepare_data --source published`).
- :mod:`.geneval_table`: GenEval's official aggregation (per-task accuracy, overall = mean of tasks).
- :mod:`.suite`: the benchmarks and metrics of the table; :mod:`.runner` generates and scores them;
  :mod:`.report` writes `table.md`, `table.json`, the GenEval task table and the bar chart.
"""
