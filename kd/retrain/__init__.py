"""`kd retrain`: the scheduled pipeline from a new data snapshot to a promoted champion.

Named, resumable stages over the layers below (train, tune, registry): validate the
snapshot -> (optional) teacher retraining -> teacher cache -> (optional) tune -> final
distillation -> evaluation of challenger and champion on the new holdout -> register ->
gate -> promote. See docs/retrain.md. Nothing below this package imports it.
"""

from kd.retrain.pipeline import Result, run_pipeline

__all__ = ["Result", "run_pipeline"]
