"""regionbert.quickstart: the whole pipeline on bundled sample data, on a CPU, in a few minutes."""
