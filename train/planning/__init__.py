"""Sizing a job before it runs: `unroll plan` and `unroll rehearse`, on fake collectives."""
