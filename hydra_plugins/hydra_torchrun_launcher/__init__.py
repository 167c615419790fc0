"""Compatibility with hydra-torchrun-launcher's module path (see ``distributed_launcher``)."""
