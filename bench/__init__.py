"""Benchmarks: a closed-loop load generator, a plain-wrapper baseline, the in-process limit, and
`python -m bench`, which runs them all against the service and prints figures and target ratios."""
