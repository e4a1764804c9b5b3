"""The PowerDistribution OPC UA information model: NodeSet2 types (spec.py -> XML) and the bulk site builder (instantiate.py)."""
