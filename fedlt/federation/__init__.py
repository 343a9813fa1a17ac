"""Flower glue: records <-> state dicts, the ClientApp and ServerApp factories, the simulation runner."""
