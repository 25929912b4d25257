"""The live side: the vsockmon link over rtnetlink, AF_PACKET capture, BPF, echo traffic, doctor.

Nothing under this package imports numpy or scapy: inside the lab VM every import costs seconds.
"""
