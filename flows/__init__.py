"""cnnflow's flows and command line, above three layers (docs/development.md, "Layers"): setup,
tracking and orchestration; the search is a package of its own beside the flows."""
