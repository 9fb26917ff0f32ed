"""A prefill-side staged-TCP link in its own process, serving CPU-tensor "KV pools" (for the tests).

Prints its endpoint_info as one JSON line, then serves until stdin closes. Region k holds bytes
`(i * 7 + k * 13) % 251` at offset i, so the reader can check every byte it got.
"""

import json
import sys

import torch

from distserve.lmdeploy_ext.staged_tcp import StagedTcpLink, StagedTcpSettings


def pattern(key: int, length: int) -> torch.Tensor:
    i = torch.arange(length, dtype=torch.int64)
    return ((i * 7 + key * 13) % 251).to(torch.uint8)


def main() -> None:
    sizes = [int(x) for x in sys.argv[1].split(",")]
    staging = int(sys.argv[2])
    link = StagedTcpLink(
        "127.0.0.1",
        StagedTcpSettings(staging_bytes=staging, chunk_bytes=64 << 10, deadline_s=30, control_timeout_s=10),
        name="peer",
    )
    pools = [pattern(k, n) for k, n in enumerate(sizes)]
    for k, t in enumerate(pools):
        link.register_region(k, t.data_ptr(), t.numel(), "cpu")
    print(json.dumps(link.endpoint_info()), flush=True)
    sys.stdin.read()
    link.close()


if __name__ == "__main__":
    main()
