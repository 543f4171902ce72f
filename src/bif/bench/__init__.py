"""Offline benchmark: settings (data, model, recipe) and shipped retraining ground truth."""
