"""eocausal: causal inference with Earth-observation imagery (the domain library; no Dagster here).

In a notebook: ``eocausal.open_study(path)`` (a study that has run) or ``eocausal.run_study(path)``
return a :class:`eocausal.results.StudyResults` (imported on first use: ``import eocausal`` stays light).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eocausal")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"



_LAZY = {"open_study", "run_study", "StudyResults"}


def __getattr__(name: str):
    if name in _LAZY:
        from eocausal import results

        return getattr(results, name)
    raise AttributeError(f"module 'eocausal' has no attribute {name!r}")
