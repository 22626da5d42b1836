"""Operating peerd: systemd, metrics, status, reports and plots, the cluster CA, the console."""
