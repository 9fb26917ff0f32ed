"""distserve-ctl: inspect and steer a distserve cluster through etcd (see docs/operations.md).

One module per command group; each exposes `add_arguments(parser)` and an async `run(ctx, args) -> int`.
The shared pieces: `context` (connection, output mode, errors), `snapshot` (one consistent read of the
cluster key space), `views` (rows shared by tables and JSON), `render` (rich tables or JSON).
"""
