"""Ray Tune over train/: the search space, the sweep, the report and choice of a trial.
See docs/architecture.md and docs/tune.md."""
