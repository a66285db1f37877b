"""Drivers: the only code that talks to the Docker engine, nftables and IPVS (netlink); the balancer backend choice."""
