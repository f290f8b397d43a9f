"""Alignment: completion log-probs, rollouts, DPO, GRPO, PPO (critic + GAE) for language models."""
