"""Tuning data: the search space (parameters and constraints as data) and the per-device database.

Neither module touches a device: the tuner (``opencl/tuner.py``) measures, these only describe and store.
"""
