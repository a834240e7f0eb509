"""Side-by-side benchmarks of kontod's jobs against the old in-backend way of doing the same work.

Run with ``python -m bench``; see ``bench/README.md``.
"""
