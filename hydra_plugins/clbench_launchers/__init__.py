"""Hydra launcher plugins shipped with clbench (Hydra finds plugins only inside the hydra_plugins namespace)."""
