"""Quantizers: one primitive (affine), its presets (schemes), its chunked execution (chunks, fused),
the bit layout (packing) and the stored form (stored). No file I/O here."""
