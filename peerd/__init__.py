"""peerd: serverless decentralized training of overlapping sub-models on a LAN."""

from peerd.task import Slicing, Task

__version__ = "0.1.0"
__all__ = ["Slicing", "Task", "__version__"]
