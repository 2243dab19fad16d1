"""The language side: the offline CLIP BPE tokenizer, the CLIP-style text encoder and the prompt
templates used to embed class names."""
