"""remlstop: whether to train a network, and when to stop, from the training data alone."""

__version__ = "0.1.0.dev0"
