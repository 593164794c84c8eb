"""sparse-msda: sparse multi-scale deformable and neighborhood attention for spconv maps."""
