"""Pixel decoders: the transformer-encoder FPN of X-Decoder and the multi-scale deformable encoder of
Mask2Former and OpenSeeD. They turn backbone features into multi-scale features and mask features."""
