"""decodekit.graphs."""
