"""Compute resources: devices, the thread budget shared by concurrent runs, parallel maps."""
