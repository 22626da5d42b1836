"""Benchmarks behind `peerd bench`: each module measures one path and prints JSON on request."""
