"""PyTorch implementations of the X-Decoder model family (X-Decoder, OpenSeeD, Mask2Former) and the
embedded demo model. No serving concerns live here: `models.predictor.Predictor` is the API the
service calls."""
