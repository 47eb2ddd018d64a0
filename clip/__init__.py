"""gradwatch.clip: gradient norms, clippers and spike detectors as lazy MLX ops.

Every clipper is called as ``clipped, info = clipper(grads, params=None)``;
``info`` is a :class:`ClipInfo` of lazy arrays and ``clipper.state`` a dict of
arrays (empty for stateless clippers), so a step compiles with
``mx.compile(step, inputs=clipper.state, outputs=clipper.state)``.
Detectors are called as ``info = detector(norm)`` and return a
:class:`DetectorInfo`. ``config()`` gives each one's name and arguments.
"""
try:
    import mlx.core  # noqa: F401  (checked first: the usual failure on Linux is here)
except ImportError as error:  # plain `mlx` on Linux ships no backend: "libmlx.so: cannot open ..."
    raise ImportError(
        f"MLX cannot load ({error}). On Linux MLX runs on its CPU backend: "
        "pip install 'mlx[cpu]' (gradwatch's own install does this)"
    ) from error

from .adagc import AdaGC
from .agc import AGC, unitwise_squared_norm
from .autoclip import AutoClip, quantile_of_first
from .base import NONFINITE_POLICIES, Clipper
from .detectors import EMADetector, SpikeDetector, ZScoreDetector
from .global_norm import GlobalNorm
from .info import ClipInfo, DetectorInfo
from .online import RecommendedClip
from .norms import global_norm, norms_and_global, squared_norm, tensor_norms
from .per_tensor import PerTensorNorm
from .robust import RobustDetector
from .skip import apply_update, skip_where
from .value_clip import ValueClip
from .zclip import ZClip

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "ClipInfo",
    "Clipper",
    "DetectorInfo",
    "EMADetector",
    "GlobalNorm",
    "NONFINITE_POLICIES",
    "PerTensorNorm",
    "RecommendedClip",
    "RobustDetector",
    "SpikeDetector",
    "ValueClip",
    "ZClip",
    "ZScoreDetector",
    "apply_update",
    "global_norm",
    "norms_and_global",
    "quantile_of_first",
    "skip_where",
    "squared_norm",
    "tensor_norms",
    "unitwise_squared_norm",
]
