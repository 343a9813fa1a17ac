"""fedlt: federated long-tailed learning simulator on Flower."""

__version__ = "0.1.0"
