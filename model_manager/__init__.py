"""Fresco's model manager: registry, promotion gates, rollouts and routes."""
