"""What a run is set up with: the settings' schema (settings), their composition by Hydra (config),
how TensorFlow runs (runtime) and the precision chosen by measuring (precision). Imports components
only."""
