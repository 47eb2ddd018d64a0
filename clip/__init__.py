"""gradwatch.clip: gradient norms, clippers and spike detectors as lazy MLX ops.

Every clipper is called as ``clipped, info = clipper(grads, params=None)``;
``info`` is a :class:`ClipInfo` of lazy arrays and ``clipper.state`` a dict of
arrays (empty for stateless clippers), so a step compiles with
``mx.compile(step, inputs=clipper.state, outputs=clipper.state)``.
Detectors are called as ``info = detector(norm)`` and return a
:class:`DetectorInfo`. ``config()`` gives each one's name and arguments.
"""
from .base import NONFINITE_POLICIES, Clipper
from .detectors import EMADetector, SpikeDetector, ZScoreDetector
from .global_norm import GlobalNorm
from .info import ClipInfo, DetectorInfo
from .norms import global_norm, norms_and_global, squared_norm, tensor_norms

__all__ = [
    "ClipInfo",
    "Clipper",
    "DetectorInfo",
    "EMADetector",
    "GlobalNorm",
    "NONFINITE_POLICIES",
    "SpikeDetector",
    "ZScoreDetector",
    "global_norm",
    "norms_and_global",
    "squared_norm",
    "tensor_norms",
]
