"""Triton kernels. They assume valid input: every check happens at the Python boundary
(:mod:`attnpkg.attention`, :mod:`attnpkg.fused_softmax`)."""
