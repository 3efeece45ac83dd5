"""Testing helpers for vecswim users: the reference engine (vecswim's semantics in plain
Python, any schema) to check an engine or a schema of your own against."""

from vecswim.testing.reference import ReferenceEngine, ReferenceTick

__all__ = ["ReferenceEngine", "ReferenceTick"]
