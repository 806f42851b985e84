"""Models: anomaly (Isolation Forest), risk (PyTorch), policy (PPO), their registry and training."""
