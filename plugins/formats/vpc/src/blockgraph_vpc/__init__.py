"""blockgraph-vpc: VHD (vpc) format driver."""

__version__ = "0.1.0"
