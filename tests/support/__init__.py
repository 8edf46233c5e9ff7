"""Helpers shared by the tests: real servers, brokers, polling."""
