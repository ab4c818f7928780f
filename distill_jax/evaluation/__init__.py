"""Retrain-from-scratch evaluation: named protocols, `evaluate` for any set kind, KRR evaluation.

`evaluate(training_set, protocol, x_test, y_test, seed=...)` trains `num_models` fresh networks
on a distilled set (any kind: the trainer draws batches through the set's own protocol) under a
named protocol ("mtt", "dsa", "dc", "frepo", "kd", "standard"; see `protocols.py` for what each
follows) and reports their final test accuracy (mean and std, never a max over time).
`krr_evaluate` is FRePo's KRR test accuracy of a set.
"""

from distill_jax.evaluation.evaluate import EvalResult, check_set, evaluate
from distill_jax.evaluation.krr import krr_accuracy, krr_evaluate
from distill_jax.evaluation.protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "PROTOCOLS",
    "EvalResult",
    "Protocol",
    "check_set",
    "evaluate",
    "get_protocol",
    "krr_accuracy",
    "krr_evaluate",
]
