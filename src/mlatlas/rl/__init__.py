"""Reinforcement learning: grid world, dynamic programming, stochastic approximation, Monte Carlo, policy gradient."""
