"""dpquant_sim.cost."""
