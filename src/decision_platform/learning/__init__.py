"""Learning from outcomes: rewards, off-policy evaluation, retraining."""
