"""Result files of a run (metrics.json, predictions.csv, roc.png) and, later, sweep tables."""
