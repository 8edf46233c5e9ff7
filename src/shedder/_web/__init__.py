"""Framework-free request handling shared by the web adapters.

Responses, adapter settings, health and the instance table.
"""
