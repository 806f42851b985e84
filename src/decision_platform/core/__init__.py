"""The bottom floor: what every other floor speaks (actions, events, rewards); imports nothing of ours."""
