"""Attention and the other hot operations: Triton kernels for CUDA and the torch
reference each one is tested against, behind one small dispatch. Knows no model.
"""
