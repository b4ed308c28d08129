"""Bundled trait kits."""
