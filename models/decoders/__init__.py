"""Transformer decoders that turn pixel features and queries into class, mask and caption outputs
(X-Decoder, OpenSeeD)."""
