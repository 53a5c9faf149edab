"""Benchmarks of the broker's pipeline, subtraction, real/bogus classifier and training-set generator."""
