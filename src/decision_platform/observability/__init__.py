"""Prometheus metrics of every stage."""
