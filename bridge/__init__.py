"""tcpbridge: carry TCP connections over websockets, wire-compatible with the Go reference."""

__version__ = "0.1.0"
