"""Serving-engine integrations (SGLang, vLLM / vLLM-Ascend): import only inside the engine's environment."""
