"""vsockmon: capture and analyse Linux virtio-vsock traffic.

Importing the package registers its scapy layers for link type 271 (files) and netdevice
type 826 (live sockets), so scapy's ``rdpcap`` decodes vsockmon captures.
"""

__version__ = "0.1.0"
