"""The speculative decoder (chain, static and dynamic trees), benchmarks, metrics, reports and plots."""
