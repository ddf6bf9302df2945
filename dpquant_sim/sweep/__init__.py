"""dpquant_sim.sweep."""
