"""The host/device boundary: the only package that moves arrays to devices."""
