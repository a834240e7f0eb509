"""The scheduler: the job contract, schedule maths, the run table and the runner.

It knows ``JobSpec`` and ``RunContext``, never a concrete job; it imports only the layers below
it (``kontod.db``, ``kontod.logs``).
"""
