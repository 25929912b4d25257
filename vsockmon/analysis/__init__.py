"""Views computed from tracked connections: the analysis pass, stats, timelines, reassembly.
"""
