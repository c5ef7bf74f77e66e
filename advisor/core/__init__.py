"""The bottom layer: what every stage shares and nothing of ours below it.

errors (exit codes), files (atomic writes), result (the AdvisorResult contract), records
(OpRecord, TensorSpec) and dtypes (the one table of traced dtype names). Modules here import no
other fusion_advisor module and no torch at import time (tests/core/test_layers.py checks both).
"""
