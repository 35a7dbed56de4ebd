"""Accuracy evaluation: perplexity of a profile's execution path against the float baseline."""
