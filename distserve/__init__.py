"""distserve: etcd-backed discovery, pre-warmed prefill/decode links and stateless routers for LMDeploy DistServe."""

__version__ = "0.1.0"
