"""Kafka: topics, the producer behind POST /events, the consumer source and decision sink of the worker."""
