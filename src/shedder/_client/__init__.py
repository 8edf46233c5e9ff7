"""The client's retry loop, retry budget and adaptive throttle (no server code)."""
