"""dpquant_sim.training.data."""
