"""Sparkplug B 3.0 over MQTT (TLS): the gateway as an edge node, with store-and-forward (docs/sparkplug.md).

- `sparkplug_b.proto`: the payload schema; `sparkplug_b_pb2.py` is generated from it (`make sparkplug-proto`);
- `catalogue.py`: metric names, aliases, datatypes, units; value encoding;
- `store.py`: the on-disk queue (SQLite, WAL);
- `edge.py`: the edge node, a lossless sink of the point table.
"""

from gateway.sparkplug.edge import EdgeNode

__all__ = ["EdgeNode"]
