"""Stateless router replicas: OpenAI API and PD orchestration from a view built from etcd (no torch here)."""
