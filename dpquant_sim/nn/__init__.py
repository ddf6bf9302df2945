"""dpquant_sim.nn."""
