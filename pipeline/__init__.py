"""Pipeline stages, one per module; each reads and writes plain files."""
