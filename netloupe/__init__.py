"""netloupe: explain neural networks at dataset scale.

The Python API (:mod:`netloupe.api`), for notebooks and scripts::

    import netloupe
    run = netloupe.open_run("runs/mnist-demo")
    run.df("SELECT label, avg(correct::INT) AS accuracy FROM instances GROUP BY 1")
    run.instance(7).maps["saliency"]
    run.dashboard()

Its names load on first use, so that ``import netloupe.<layer>`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["Run", "InstanceRecord", "open_run", "explain", "methods", "compare", "Comparison"]

_HOMES = {"Run": "netloupe.api", "open_run": "netloupe.api", "explain": "netloupe.api", "methods": "netloupe.api",
          "compare": "netloupe.api", "Comparison": "netloupe.api",
          "InstanceRecord": "netloupe.storage.instance"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'netloupe' has no attribute {name!r}; the API is {', '.join(__all__)}")


def __dir__() -> list[str]:
    return sorted(__all__)
