"""Frames from records: the bulk decoder, display filters, per-frame rendering, the tshark check.
"""
