"""Data files shipped with the pipeline (confidentiality profile table)."""
