"""gradwatch.clip: gradient norms, clippers and spike detectors as lazy MLX ops.

Every clipper is called as ``clipped, info = clipper(grads, params=None)``;
``info`` is a :class:`ClipInfo` of lazy arrays and ``clipper.state`` a dict of
arrays (empty for stateless clippers), so a step compiles with
``mx.compile(step, inputs=clipper.state, outputs=clipper.state)``.
Detectors are called as ``info = detector(norm)`` and return a
:class:`DetectorInfo`. ``config()`` gives each one's name and arguments.

The names load on first use: ``gradwatch.clip.spike_rule`` (the spike rule in NumPy,
shared with the server) can be imported without MLX.
"""
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Where each public name lives. Loaded on first use (PEP 562), so that the pure-NumPy
# `gradwatch.clip.spike_rule`, which the server imports, loads no MLX.
_WHERE = {
    "AdaGC": "adagc", "AGC": "agc", "unitwise_squared_norm": "agc", "AutoClip": "autoclip",
    "quantile_of_first": "autoclip", "NONFINITE_POLICIES": "base", "Clipper": "base",
    "EMADetector": "detectors", "SpikeDetector": "detectors", "ZScoreDetector": "detectors",
    "GlobalNorm": "global_norm", "ClipInfo": "info", "DetectorInfo": "info", "RecommendedClip": "online",
    "global_norm": "norms", "norms_and_global": "norms", "squared_norm": "norms", "tensor_norms": "norms",
    "PerTensorNorm": "per_tensor", "RobustDetector": "robust", "apply_update": "skip", "skip_where": "skip",
    "ValueClip": "value_clip", "ZClip": "zclip",
}


def _load_mlx() -> None:
    try:
        import mlx.core  # noqa: F401  (checked first: the usual failure on Linux is here)
    except ImportError as error:  # plain `mlx` on Linux ships no backend: "libmlx.so: cannot open ..."
        raise ImportError(
            f"MLX cannot load ({error}). On Linux MLX runs on its CPU backend: "
            "pip install 'mlx[cpu]' (gradwatch's own install does this)"
        ) from error


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_mlx()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    """`global_norm` is both a function (from `norms`) and a submodule (`global_norm.py`, where
    `GlobalNorm` lives). Loading that submodule lazily would bind the module over the function
    (the import system sets the package attribute): the function keeps the name, as it did when
    everything was imported eagerly; the submodule stays in `sys.modules`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and editors: the names, as if imported eagerly
    from .adagc import AdaGC
    from .agc import AGC, unitwise_squared_norm
    from .autoclip import AutoClip, quantile_of_first
    from .base import NONFINITE_POLICIES, Clipper
    from .detectors import EMADetector, SpikeDetector, ZScoreDetector
    from .global_norm import GlobalNorm
    from .info import ClipInfo, DetectorInfo
    from .norms import global_norm, norms_and_global, squared_norm, tensor_norms
    from .online import RecommendedClip
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
