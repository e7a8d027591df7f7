"""decodekit.runtime."""
