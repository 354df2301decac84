"""fedfraud: federated fraud detection for bank consortia."""

__version__ = "0.1.0"
