"""Composition chemistry: parsing, encoding, validity and descriptors. Imports nothing else of agd."""
