"""Benchmarks: `python -m effitrans.bench <name> [args]` runs effitrans.bench.<name>.main(argv)."""
