"""The engine agent: registers one engine in etcd under a lease, keeps it live, links decode engines with
every compatible prefill engine ahead of traffic, publishes load and honours operator flags.

It speaks only the engine protocol (HTTP), so it serves a stock lmdeploy api_server as a sidecar
(`distserve agent`) and the reference engine in-process (`distserve engine --etcd ...`). See docs/agent.md.
"""
