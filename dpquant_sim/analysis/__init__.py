"""dpquant_sim.analysis."""
