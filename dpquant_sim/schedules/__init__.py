"""dpquant_sim.schedules."""
