"""Network training: the one trainer and what is built on it (experts, the online model pool).

`Recipe` (recipe.py) says how networks train; `Trainer` (trainer.py) trains them on any
distilled-set kind; `experts.py` records expert trajectories into a `TrajectoryStore`
(trajectories.py); `model_pool.py` is FRePo's online pool.
"""

from distill_jax.training.recipe import Recipe
from distill_jax.training.trainer import (
    TrainResult, TrainState, Trainer, classification_accuracy, epoch_batch, loss_and_grads,
)

__all__ = [
    "Recipe",
    "TrainResult",
    "TrainState",
    "Trainer",
    "classification_accuracy",
    "epoch_batch",
    "loss_and_grads",
]
