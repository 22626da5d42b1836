"""peerd: serverless decentralized training of overlapping sub-models on a LAN."""

__version__ = "0.1.0"
