"""The runtime: expert store, MoE executor, generation loop, sampler, profiler."""
