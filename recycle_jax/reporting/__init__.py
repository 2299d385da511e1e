"""Results of a run: results.json and report.md (`records`), statistics (`statistics`),
figures (`figures`) and TensorBoard scalars (`metrics`).

Imports: every package below it."""
