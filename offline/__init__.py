"""Offline stage: dataset import, the nightly knowledge-refresh job, training and evaluation."""
