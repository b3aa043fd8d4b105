"""The model zoo: offline data sources (`data`, `signs`), backdoor attacks (`attacks`), the trainer
and the round writer. Submodules are imported explicitly; importing this package does nothing."""
