"""Inference: load a checkpoint on one device and generate with a KV cache (`generate.py`)."""
