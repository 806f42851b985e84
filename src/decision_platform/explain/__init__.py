"""Explanations an auditor can trust.

On the hot path (every decision, well under a millisecond): ``attributions`` (DeepLIFT shares of
the risk, Shapley contributors of the anomaly score), ``ranges`` (what is typical), ``reasons`` (reason
codes and the template sentence). Off it: ``facts`` -> ``prompt`` -> ``llm`` (Ollama, OpenAI-compatible,
or an embedded llama.cpp server) -> ``grounding`` check -> ``narrator`` (background thread, cached in the
database); ``cli`` is ``decision-platform explain``.
"""
