"""Training: one explicit loop (`loop.py`) driven by a recipe (`recipe.py`, `recipes/*.json`).

Inference never imports this package.
"""
