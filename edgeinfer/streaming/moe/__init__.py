"""MoE expert offloading (HOBBIT-style): the per-layer expert cache and its eviction
policies (expert_cache), routing (router), the streamed op with next-layer prefetch (op)
and the resident op (resident). Record layouts are in edgeinfer.format.experts, kernels
in edgeinfer.kernels.experts."""
