"""The benchmarks behind `tuner bench`, apart from the product they measure: `epochs` (an
epoch on tuner's path against a DataLoader reference, compiled modes, packed workers),
`overhead` (what tuner's bookkeeping costs a study) and `ensembles` (greedy selection against
the top-K average)."""
