"""Analysis: the main job's report, the study and the radius-signal diagnostic.

Computing functions return plain data (dicts, lists); tables and plots render it.
"""
