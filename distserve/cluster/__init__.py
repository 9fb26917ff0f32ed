"""One model of the cluster, shared by router, agent and distserve-ctl.

- `keys`: the etcd key schema; `records`: the typed values under it; `codec`: key + value -> typed record
  (ids checked against the key, one error type); `topology`: what is routable; `cache`: a shared informer
  (one list+watch per record kind, typed maps, many change handlers); `settings`: the environment
  variables every component shares (the cluster name and token).
"""
