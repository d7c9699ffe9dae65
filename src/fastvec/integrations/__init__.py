"""Adapters for trainers that do not take a Gymnasium vector env as it is."""
