"""Adapter module under construction."""
