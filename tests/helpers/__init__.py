"""What several test modules share: tiny fits, saved tiny models, synthetic data, kill points."""
