"""Rules over connections and frames that turn a capture into findings with evidence and fixes.
"""
