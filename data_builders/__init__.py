"""Data builders: readers for each source format, the Zephyr formatter, critique-and-rewrite, triplets."""
