"""Cluster-side helpers: connecting to Ray, job submission and cluster manifests."""
