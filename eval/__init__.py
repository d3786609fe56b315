"""The eval stage: benchmarks, metrics, reports and plots over the speculative decoder (decoding/)."""
