"""Sparse FFN streaming: row-column bundles, sparsity predictors, the neuron window."""
