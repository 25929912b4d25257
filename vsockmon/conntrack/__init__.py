"""Connection tracking: the per-connection state machine and flow-credit accounting, in bulk.
"""
