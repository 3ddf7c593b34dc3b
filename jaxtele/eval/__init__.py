"""Evaluation: perplexity, generation."""
