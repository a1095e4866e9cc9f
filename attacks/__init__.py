"""Victim training against protected data: the evaluation side of protect.

``attacks`` may import ``protect``; ``protect`` never imports ``attacks``.
"""
