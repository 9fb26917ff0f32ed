"""distserve's integration with stock lmdeploy engines (optional: `pip install 'distserve[lmdeploy]'`).

- `staged_tcp`: KV migration through DLSlime's TCP endpoint with host staging (no RDMA needed).
- `backend`: that path as an lmdeploy migration backend, beside lmdeploy's own RDMA/NVLink path.
- `server_patches`: api_server fixes (remote_session_id in prefill answers, migration_request checks).
- `serve`: the launcher, `python -m distserve.lmdeploy_ext.serve api_server MODEL --role Prefill ...`.

Nothing here is imported by the router, agent or ctl.
"""
