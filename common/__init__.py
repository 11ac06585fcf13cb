"""Shared machinery of the LoFT stage scripts (01–04)."""
