"""Benchmarks of karbor-async against the event-loop floors and Karbor's TaskFlow engine.

Run ``python -m benchmarks [--quick]``; see ``benchmarks/RESULTS.md``.
"""
