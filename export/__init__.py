"""decodekit.export."""
