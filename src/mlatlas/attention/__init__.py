"""Efficient attention: FlashAttention, linear attention, Performer, TransNormer. Inputs are [batch, heads, seq, head_dim]."""
