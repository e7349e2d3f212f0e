"""From an error table to a plan: the allocation problem with its budget and
constraints (``problem``), the registered solvers (``solvers.SOLVERS``), the
baselines a user would pick instead (``baselines``), and closed-loop
refinement with the guard against uniform (``refine``). Reads ``table.py``,
never ``scorers/``."""
