"""Analysis of run folders: ``haif compare``, ``haif query`` and ``haif regress``.

A *run folder* holds ``records.parquet`` (one row per request, the schema
both the simulator and the live cluster write, :mod:`haif.records`) and,
when ``haif sim`` wrote it, ``timeseries.parquet``, ``utilization.parquet``
and ``summary.json``.

:mod:`haif.analysis.compare`
    Runs side by side: success rate, goodput, TTFT / end-to-end p50 / p90 /
    p99, SLO attainment, retries, dead letters, cost and GPU utilization,
    with deltas against the first run; ``compare.md``, overlaid latency CDFs
    and time series with fault windows shaded.
:mod:`haif.analysis.query`
    SQL (DuckDB) over many runs' Parquet files: ``records`` /
    ``timeseries`` / ``utilization`` views across runs with a ``run``
    column, and one view per run and file; the cells of ``haif sweep``
    folders are runs too (``sweep_cells``, ``sweep_aggregate``).
:mod:`haif.analysis.sweep`
    Scenarios over a grid of overrides and seeds, aggregated with 95 %
    confidence intervals (:mod:`haif.analysis.stats`, which also holds the
    rule for naming a winner that the sweep and the placement notebook use).
:mod:`haif.analysis.regress`
    The canonical scenario set (``regress/canonical.yaml``), the committed
    baseline (``reports/baseline``) and per-metric thresholds
    (``regress/thresholds.yaml``): a Markdown report and a non-zero exit
    code on a regression.
:mod:`haif.analysis.cli`
    ``add_analysis_commands(subparsers)`` registers the three commands.
"""
