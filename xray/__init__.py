"""xray: scan corpora of trained image classifiers for backdoors."""

__version__ = "0.1.0"
