"""Evaluation: tasks, sandboxed code execution, the eval harness."""
