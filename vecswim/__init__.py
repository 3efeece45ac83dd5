"""vecswim: SwimOS-style stateful agents as rows of columnar tables, updated by numba kernels
in millisecond ticks.

Declare agent types (:class:`AgentType`, :class:`Column` with rules such as :func:`latest`,
:func:`ewma`, :func:`hysteresis`), relate them with :class:`Link` and ``vecswim.agg``
aggregates, and drive an :class:`Engine` with event batches or a source.
"""

from vecswim import agg
from vecswim.engine import Engine, TickStats
from vecswim.schema import (
    AgentType,
    Column,
    Link,
    count,
    custom,
    ewma,
    hysteresis,
    latest,
    max,
    mean,
    min,
    state,
    sum,
)
from vecswim.sinks import CallbackSink, MemorySink, NDJSONSink, ParquetSink
from vecswim.sources import FileSource, GeneratorSource, ListSource
from vecswim.sql import SQLError

__all__ = [
    "AgentType",
    "CallbackSink",
    "Column",
    "Engine",
    "FileSource",
    "GeneratorSource",
    "Link",
    "ListSource",
    "MemorySink",
    "NDJSONSink",
    "ParquetSink",
    "SQLError",
    "TickStats",
    "agg",
    "count",
    "custom",
    "ewma",
    "hysteresis",
    "latest",
    "max",
    "mean",
    "min",
    "state",
    "sum",
]
__version__ = "0.1.0"
