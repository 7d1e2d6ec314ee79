"""Curation stages: plain functions and classes, usable without Ray (``pipeline.py`` schedules them).

probe · split · clip (cut, cheap filters, encode) · filters · models (OCR/NSFW/aesthetic,
captioner) · caption · dedup · latents
"""
