"""depthwave: fast, faithful inference for recurrent-depth language models."""
