"""Runtime: process groups and parallel layout, plus the CPU runtime for megatron-core on gloo."""
