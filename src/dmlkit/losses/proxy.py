"""Proxy-based losses: learnable class proxies/centres compared with embeddings."""

from __future__ import annotations
