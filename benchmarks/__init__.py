"""medkernels' benchmark suite (not part of the installed package): ``python -m benchmarks`` from the
repository root times every op and both networks against their baselines; ``pytest benchmarks/
--benchmark-only`` runs the op cases as a pytest-benchmark suite. See benchmarks/README.md."""
