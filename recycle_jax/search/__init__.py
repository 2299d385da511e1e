"""The search: the generation loop and its state (`loop`), the strategies registry
(`strategies`), population programs (`population`), the baselines (`baselines`) and
Pareto fronts and scalarizations (`pareto`).

Imports: every package below reporting."""
