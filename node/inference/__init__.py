"""Inference: sampling, fingerprints, hardware, the llama.cpp engines."""
