"""swapd: many LLMs behind one OpenAI-compatible port, loaded on demand into measured memory."""

__version__ = "0.1.0"
