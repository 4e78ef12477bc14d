"""Benchmark evaluation: metrics (Pearson, Spearman, Kendall, RMSE), predictions, scatter plots, MLflow."""
