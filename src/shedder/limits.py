"""Adaptive concurrency limits: let the throttler find ``max_concurrency`` by itself.

``Throttler(max_concurrency=VegasLimit())`` starts at the algorithm's initial limit and moves it
with every completed request's latency. The documentation's "Adaptive limits" page compares
the algorithms on the overload benchmark.
"""

from ._core.limits import AIMDLimit, FixedLimit, Gradient2Limit, Limit, VegasLimit

__all__ = ["AIMDLimit", "FixedLimit", "Gradient2Limit", "Limit", "VegasLimit"]
