"""moe-ops benchmark matrix: ``python -m bench --preset quick`` (see docs/benchmarks.md).

Modules: ``shapes`` (named model shapes), ``cases`` (inputs, timed callables, byte/FLOP counts,
baselines), ``timing`` (median of repeats), ``report`` (CSV + markdown), ``run`` (the CLI),
``plot`` (PNG plots from the CSV, a separate script).
"""
