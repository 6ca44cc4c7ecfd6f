"""eocausal: causal inference with Earth-observation imagery (the domain library; no Dagster here)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eocausal")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

