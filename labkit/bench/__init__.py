"""What notebooks and benchmarks/ share for side-by-side measurements."""
