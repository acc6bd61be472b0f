"""Every way of assembling Tandem's components: the in-process cluster (embedded mode, tests,
benchmarks) and the local multi-process supervisor with its bundled NATS."""

from tandem.deploy.cluster import LocalCluster

__all__ = ["LocalCluster"]
