"""Ingestion pipeline: partition -> clean -> chunk -> embed -> index. Pure stage functions, no Django."""
