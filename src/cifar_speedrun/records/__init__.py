"""What a run leaves and what is made of it: results.json, model files, logs, W&B, resume, reports."""
