"""The wire: header field tables, pcap/pcapng reading and writing, scapy layers.

Nothing here knows about connections or terminals; everything above builds on it.
"""
