"""gradwatch.agent: records gradient norms in the training process and ships them.

    from gradwatch.agent import GradWatch
    from gradwatch.clip import GlobalNorm

    with GradWatch(run="tiny-gpt", url="http://127.0.0.1:8765", clipper=GlobalNorm(1.0)) as watch:
        ...
        grads = watch.step(grads, loss=loss)
"""
from .recorder import CompiledStepError, NonFiniteGradientError
from .stats import FlushResult, Stats
from .watch import GradWatch

__all__ = ["CompiledStepError", "FlushResult", "GradWatch", "NonFiniteGradientError", "Stats"]
