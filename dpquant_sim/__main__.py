from dpquant_sim.cli import main

main()
