"""Strategies that turn banks' updates into the next global model; one module each."""

from aggregator.strategies.bagging import Bagging
from aggregator.strategies.base import Strategy
from aggregator.strategies.cyclic import Cyclic
from aggregator.strategies.histogram import Histogram

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Bagging, Cyclic, Histogram)}

__all__ = ["STRATEGIES", "Bagging", "Cyclic", "Histogram", "Strategy"]
