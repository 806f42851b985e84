"""Fitting the models (anomaly, risk, policy) and their baselines on labelled events; the simulator.

Light on purpose: importing the package (for the defaults below) does not import torch or SB3.
"""

#: PPO steps of a training from scratch (`train`, `make run`, bench); retraining fine-tunes a warm-started
#: policy with fewer (config/learning.yaml).
PPO_TIMESTEPS = 50_000
