"""Op benchmarks of oreo_fast (pytest-benchmark; not part of ``make test``). See README.md."""
