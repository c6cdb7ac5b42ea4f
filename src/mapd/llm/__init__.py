"""Model calls: one keyed call path (Dispatcher.complete), one cache, one provider per kind of endpoint.

The dispatcher and cache are imported on first use, so importing the call types does not pay for the
openai client.
"""

from importlib import import_module

from mapd.llm.base import Call, CallKey, CallResult

__all__ = ["Call", "CallKey", "CallResult", "CallCache", "Dispatcher", "BudgetExceeded"]
_LAZY = {"CallCache": "mapd.llm.cache", "Dispatcher": "mapd.llm.dispatch", "BudgetExceeded": "mapd.llm.dispatch"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mapd.llm' has no attribute {name!r}")
