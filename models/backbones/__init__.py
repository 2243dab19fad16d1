"""Image backbones, one architecture per file (FocalNet, Swin), with official parameter names."""
