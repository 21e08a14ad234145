"""The mesh: the coordinator (server and store) and, later, the agent.

Layer: imports ``pywg.manage`` and below, never ``pywg.device`` internals.
"""
