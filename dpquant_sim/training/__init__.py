"""dpquant_sim.training."""
