"""ddfm: decentralized discrete flow matching — train K experts apart, generate as one."""

__version__ = "0.1.0"
