"""Reproducer (GPU machine): CPU-backend calls right after an NVIDIA OpenCL call take milliseconds instead of
microseconds. Prints CPU call times alone and after a GPU call with growing gaps, and the busiest threads.

    source .gpu/setup.sh && python3 benchmarks/cpu_stall_after_gpu.py
"""
