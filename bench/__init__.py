"""ami.bench: results tables, the parity suite and latency benchmarks."""
