"""Generative models: DDPM, DDIM, score SDEs, rectified flow, normalizing flows, guidance."""
