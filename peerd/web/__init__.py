"""The HTTP side of a daemon and of `peerd cluster`: Prometheus metrics, a live page and its
JSON API (docs/WEB.md), served read-only on the asyncio loop of the process."""
