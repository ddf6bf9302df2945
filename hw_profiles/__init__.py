"""Shipped accelerator profiles (one YAML file per accelerator); installed as ``dpquant_sim.hw_profiles``."""
