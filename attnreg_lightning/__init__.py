"""Bootstrap-regularized attention maps for Vision Transformers (Chung & Laletin, AISTATS 2026)."""
