"""dpquant_sim.numerics."""
