"""vitrine's command line: the top layer (it may import flows, components and monitoring)."""
