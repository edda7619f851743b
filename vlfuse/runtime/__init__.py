"""Acceleration, in one place: the fast copies of plain PyTorch modules that inference runs on."""
