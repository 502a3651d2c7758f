"""The OpenAI-compatible HTTP server over the engine (`depthwave serve`; needs the `serve` extra)."""
