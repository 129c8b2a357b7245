"""MoE expert offloading (HOBBIT-style): expert records (layout), the per-layer expert cache
and its eviction policies (expert_cache), next-layer prefetch (prefetch), the streaming op
(streaming) and the resident op (op), with their kernels."""
