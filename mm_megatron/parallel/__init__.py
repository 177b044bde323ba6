"""Parallelism helpers (context/sequence-parallel data layout) for mm_megatron."""
