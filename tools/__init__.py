"""decodekit.tools."""
