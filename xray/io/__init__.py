"""Storage, manifests, example data and safe model loading."""
