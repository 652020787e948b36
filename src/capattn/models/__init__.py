"""Models: the image encoder, attention, and the caption decoders."""
